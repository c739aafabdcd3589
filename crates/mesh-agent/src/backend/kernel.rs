//! Kernel WireGuard: the `wg-harness` link is created with rtnetlink (kind `wireguard`) and
//! configured over generic netlink (the `wireguard` family), as `wg(8)` does.
//!
//! [`KernelDevice::open`] adopts an existing link of kind `wireguard` (a restarted agent keeps the
//! running tunnels) or creates one; it leaves the link's state (up or down), addresses and MTU
//! alone. The kernel refusing the kind (`EOPNOTSUPP`, "Unknown device type") or lacking the
//! generic netlink family is [`KernelError::Unsupported`]; a link of that name that is a tun
//! device (wireguard-go's) is [`KernelError::UserspaceLink`]. Both make `--wireguard auto` use
//! the userspace backend.
//!
//! Reading is a `WG_CMD_GET_DEVICE` dump. The kernel spreads a large device over several
//! messages, and one peer's allowed IPs over several of them (a continued peer repeats only its
//! public key), so the parts are merged by public key; a dump the kernel marks as interrupted
//! (the device changed meanwhile) is read again.
//!
//! Writing is `WG_CMD_SET_DEVICE` with only what the [`DevicePlan`] changes: removed peers carry
//! `WGPEER_F_REMOVE_ME`; added peers `WGPEER_F_REPLACE_ALLOWEDIPS` with their endpoint, keepalive
//! and allowed IPs; changed peers `WGPEER_F_UPDATE_ONLY` (so a peer removed meanwhile is not
//! brought back) with only the changed fields, plus `WGPEER_F_REPLACE_ALLOWEDIPS` when their
//! allowed IPs change. Like `wg(8)`, a plan is split into messages of at most one page (4096
//! bytes): a peer that does not fit in the current message goes whole into the next one, and only
//! a peer too large for a message of its own is cut, continuing in the next message with its
//! public key and the rest of its allowed IPs (appended, not replaced).
//!
//! The mapping between plans, device states and netlink attributes is pure (`set_messages`,
//! `device_from_dump`) and unit-tested; every request opens its own netlink socket, so nothing
//! goes stale when the module is reloaded or the link is recreated.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use genetlink::{GenetlinkError, GenetlinkHandle};
use ipnet::IpNet;
use mesh_wireguard::{DevicePlan, DeviceState, Key, KeyError, PeerState, PrivateKey};
use netlink_packet_core::{Emitable, ErrorMessage};
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute, WireguardCmd,
    WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags, WireguardTimeSpec,
};
use rtnetlink::LinkWireguard;

/// The longest interface name the kernel accepts (`IFNAMSIZ` - 1).
const MAX_NAME_LEN: usize = 15;
/// The largest set request, headers included: what `wg(8)` uses (`MNL_SOCKET_BUFFER_SIZE` on
/// 4 KiB pages).
const MAX_MESSAGE_LEN: usize = 4096;
/// `struct nlmsghdr` plus `struct genlmsghdr`.
const HEADERS_LEN: usize = 16 + 4;
/// `struct nlattr`, the header of a nested attribute.
const NLA_HEADER_LEN: usize = 4;
/// How often a dump is read again when the kernel says the device changed during it.
const DUMP_ATTEMPTS: usize = 3;

const EPERM: i32 = 1;
const ENOENT: i32 = 2;
const EACCES: i32 = 13;
const EEXIST: i32 = 17;
const ENODEV: i32 = 19;
const EOPNOTSUPP: i32 = 95;

/// Why the kernel device could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel has no WireGuard (module missing or not loadable).
    #[error("the kernel has no WireGuard support: {0}")]
    Unsupported(String),
    /// The interface exists as a tun device, which is what wireguard-go runs on: the kernel
    /// backend leaves it alone so that the userspace backend can adopt it.
    #[error(
        "{interface} is a tun device (wireguard-go's), not a kernel WireGuard link; it is left to the userspace \
         backend (delete it with `ip link del {interface}` to use kernel WireGuard instead)"
    )]
    UserspaceLink {
        /// The interface.
        interface: String,
    },
    /// Anything else (permissions, netlink failures).
    #[error("kernel WireGuard on {interface}: {message}")]
    Failed {
        /// The interface.
        interface: String,
        /// What went wrong.
        message: String,
    },
}

impl KernelError {
    /// True when the kernel backend cannot serve this interface but the userspace backend can:
    /// the kernel simply lacks WireGuard ([`KernelError::Unsupported`]), or the interface already
    /// is a wireguard-go device ([`KernelError::UserspaceLink`]).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Self::Unsupported(_) | Self::UserspaceLink { .. })
    }
}

fn failed(interface: &str, message: impl Into<String>) -> KernelError {
    KernelError::Failed { interface: interface.to_owned(), message: message.into() }
}

/// A kernel WireGuard link.
#[derive(Debug)]
pub struct KernelDevice {
    interface: String,
}

impl KernelDevice {
    /// Uses the link `interface`, creating it with kind `wireguard` if it does not exist, and
    /// checks that the kernel answers on the `wireguard` generic netlink family.
    ///
    /// A link of that name of another kind is never touched: a tun device gives
    /// [`KernelError::UserspaceLink`], anything else [`KernelError::Failed`].
    pub async fn open(interface: &str) -> Result<Self, KernelError> {
        check_name(interface)?;
        let device = Self { interface: interface.to_owned() };
        device.ensure_link().await?;
        Genl::connect(interface)?.resolve_family().await?;
        Ok(device)
    }

    /// Reads the device over generic netlink (`WG_CMD_GET_DEVICE`).
    pub async fn get(&self) -> Result<DeviceState, KernelError> {
        let genl = Genl::connect(&self.interface)?;
        let mut attempt = 1;
        loop {
            let (parts, interrupted) = genl.dump().await?;
            if interrupted {
                if attempt < DUMP_ATTEMPTS {
                    attempt += 1;
                    continue;
                }
                return Err(failed(
                    &self.interface,
                    format!(
                        "the device changed during each of {DUMP_ATTEMPTS} reads (is another program configuring \
                         it?); the next reconcile reads it again"
                    ),
                ));
            }
            return device_from_dump(parts).map_err(|why| {
                failed(&self.interface, format!("the kernel's answer to WG_CMD_GET_DEVICE is malformed: {why}"))
            });
        }
    }

    /// Applies a plan over generic netlink (`WG_CMD_SET_DEVICE`), in as many messages as it
    /// takes; an empty plan sends nothing.
    pub async fn apply(&self, plan: &DevicePlan) -> Result<(), KernelError> {
        let messages = set_messages(&self.interface, plan)?;
        if messages.is_empty() {
            return Ok(());
        }
        let genl = Genl::connect(&self.interface)?;
        let total = messages.len();
        for (index, attributes) in messages.into_iter().enumerate() {
            genl.set(attributes).await.map_err(|err| match err {
                KernelError::Failed { interface, message } if total > 1 => KernelError::Failed {
                    interface,
                    message: format!(
                        "{message} (in message {} of {total}; the earlier ones were applied, the next reconcile \
                         reads the device and diffs again)",
                        index + 1
                    ),
                },
                other => other,
            })?;
        }
        Ok(())
    }

    /// Finds the link, or creates it.
    async fn ensure_link(&self) -> Result<(), KernelError> {
        let interface = self.interface.as_str();
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|err| failed(interface, format!("opening a route netlink socket failed: {err}")))?;
        let _connection = AbortOnDrop(tokio::spawn(connection));
        // A second round only follows an EEXIST: someone created the link in the meantime.
        for _ in 0..2 {
            if let Some(kind) = link_kind(&handle, interface).await? {
                return check_kind(interface, kind);
            }
            match handle.link().add(LinkWireguard::new(interface).build()).execute().await {
                Ok(()) => {
                    tracing::info!(interface, "created the kernel WireGuard link");
                    return Ok(());
                }
                Err(err) => match route_errno(&err) {
                    Some(EOPNOTSUPP) => {
                        return Err(KernelError::Unsupported(format!(
                            "creating {interface} with kind wireguard was refused with EOPNOTSUPP (\"Unknown device \
                             type\"): the wireguard module is neither built into this kernel nor loadable"
                        )));
                    }
                    Some(EEXIST) => continue,
                    Some(EPERM | EACCES) => {
                        return Err(failed(
                            interface,
                            format!(
                                "creating the link was refused ({}); the agent needs CAP_NET_ADMIN: run it as \
                                 root or grant it that capability",
                                route_error_text(&err)
                            ),
                        ));
                    }
                    _ => {
                        return Err(failed(
                            interface,
                            format!("creating the link with kind wireguard failed: {}", route_error_text(&err)),
                        ));
                    }
                },
            }
        }
        Err(failed(
            interface,
            "the link appeared and disappeared again while it was being created; another program is managing it, \
             stop that program or choose another interface name",
        ))
    }
}

/// Refuses names the kernel would refuse, with a message that says why.
fn check_name(interface: &str) -> Result<(), KernelError> {
    let bad = |why: &str| {
        Err(failed(interface, format!("{interface:?} is not a valid interface name: {why}; choose another name")))
    };
    if interface.is_empty() {
        return bad("it is empty");
    }
    if interface.len() > MAX_NAME_LEN {
        return bad("it is longer than 15 bytes");
    }
    if interface == "." || interface == ".." || interface.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return bad("it contains '/', ':' or whitespace, or is '.' or '..'");
    }
    Ok(())
}

/// What to do with an existing link of this kind (`None`: a link without a kind, such as a
/// physical NIC or `lo`).
fn check_kind(interface: &str, kind: Option<InfoKind>) -> Result<(), KernelError> {
    match kind {
        Some(InfoKind::Wireguard) => {
            tracing::info!(interface, "adopting the existing kernel WireGuard link; its tunnels stay up");
            Ok(())
        }
        Some(InfoKind::Tun) => Err(KernelError::UserspaceLink { interface: interface.to_owned() }),
        Some(kind) => Err(failed(
            interface,
            format!(
                "a link of that name exists with kind {kind}, not wireguard; the agent does not touch it: delete it \
                 (`ip link del {interface}`) or choose another interface name"
            ),
        )),
        None => Err(failed(
            interface,
            "a link of that name exists and is not a virtual device (a physical NIC or loopback?); choose another \
             interface name",
        )),
    }
}

/// The link's kind: `None` if there is no such link, `Some(None)` if it has no kind.
async fn link_kind(handle: &rtnetlink::Handle, interface: &str) -> Result<Option<Option<InfoKind>>, KernelError> {
    let mut links = pin!(handle.link().get().match_name(interface).execute());
    match links.next().await {
        None => Ok(None),
        Some(Ok(link)) => Ok(Some(kind_of(&link))),
        Some(Err(err)) if route_errno(&err) == Some(ENODEV) => Ok(None),
        Some(Err(err)) => Err(failed(interface, format!("looking up the link failed: {}", route_error_text(&err)))),
    }
}

fn kind_of(link: &LinkMessage) -> Option<InfoKind> {
    link.attributes.iter().find_map(|attribute| match attribute {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
            LinkInfo::Kind(kind) => Some(kind.clone()),
            _ => None,
        }),
        _ => None,
    })
}

fn route_errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(message) => errno(message),
        _ => None,
    }
}

/// An rtnetlink error as the OS names it ("Operation not permitted (os error 1)").
fn route_error_text(err: &rtnetlink::Error) -> String {
    match route_errno(err) {
        Some(code) => std::io::Error::from_raw_os_error(code).to_string(),
        None => err.to_string(),
    }
}

/// The positive errno of a NACK; `None` for an ACK.
fn errno(message: &ErrorMessage) -> Option<i32> {
    message.code.map(|code| code.get().saturating_abs())
}

/// Aborts a spawned netlink connection task when the request that needed it is done.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A generic netlink connection, for one `get` or `apply`.
struct Genl {
    interface: String,
    handle: GenetlinkHandle,
    _connection: AbortOnDrop,
}

impl Genl {
    fn connect(interface: &str) -> Result<Self, KernelError> {
        let (connection, handle, _) = genetlink::new_connection()
            .map_err(|err| failed(interface, format!("opening a generic netlink socket failed: {err}")))?;
        Ok(Self { interface: interface.to_owned(), handle, _connection: AbortOnDrop(tokio::spawn(connection)) })
    }

    async fn resolve_family(&self) -> Result<(), KernelError> {
        self.handle
            .resolve_family::<WireguardMessage>()
            .await
            .map(drop)
            .map_err(|err| self.genl_error("resolving the generic netlink family \"wireguard\"", err))
    }

    /// One `WG_CMD_GET_DEVICE` dump: the attributes of each message, and whether the kernel
    /// marked the dump as interrupted.
    async fn dump(&self) -> Result<(Vec<Vec<WireguardAttribute>>, bool), KernelError> {
        let what = "WG_CMD_GET_DEVICE";
        let mut request = NetlinkMessage::from(GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(self.interface.clone())],
        }));
        request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        request.finalize();
        let mut handle = self.handle.clone();
        let mut responses = pin!(handle.request(request).await.map_err(|err| self.genl_error(what, err))?);
        let mut parts = Vec::new();
        let mut interrupted = false;
        while let Some(response) = responses.next().await {
            let response = response.map_err(|err| {
                failed(&self.interface, format!("the kernel's answer to {what} could not be decoded: {err}"))
            })?;
            interrupted |= response.header.flags & NLM_F_DUMP_INTR != 0;
            match response.payload {
                NetlinkPayload::InnerMessage(message) => parts.push(message.payload.attributes),
                NetlinkPayload::Error(message) => {
                    if let Some(code) = errno(&message) {
                        return Err(self.errno_error(what, code));
                    }
                }
                NetlinkPayload::Done(done) if done.code != 0 => {
                    return Err(self.errno_error(what, done.code.saturating_abs()));
                }
                _ => {}
            }
        }
        Ok((parts, interrupted))
    }

    /// One `WG_CMD_SET_DEVICE` request, acknowledged.
    async fn set(&self, attributes: Vec<WireguardAttribute>) -> Result<(), KernelError> {
        let what = "WG_CMD_SET_DEVICE";
        let mut request = NetlinkMessage::from(GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        }));
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        request.finalize();
        let mut handle = self.handle.clone();
        let mut responses = pin!(handle.request(request).await.map_err(|err| self.genl_error(what, err))?);
        while let Some(response) = responses.next().await {
            let response = response.map_err(|err| {
                failed(&self.interface, format!("the kernel's answer to {what} could not be decoded: {err}"))
            })?;
            if let NetlinkPayload::Error(message) = response.payload
                && let Some(code) = errno(&message)
            {
                return Err(self.errno_error(what, code));
            }
        }
        Ok(())
    }

    fn genl_error(&self, what: &str, err: GenetlinkError) -> KernelError {
        match err {
            GenetlinkError::NetlinkError(io) => match io.raw_os_error() {
                Some(code) => self.errno_error(what, code),
                None => failed(&self.interface, format!("{what} failed: {io}")),
            },
            other => failed(&self.interface, format!("{what} failed: {other}")),
        }
    }

    fn errno_error(&self, what: &str, code: i32) -> KernelError {
        let os = std::io::Error::from_raw_os_error(code);
        let interface = &self.interface;
        match code {
            // The controller answers ENOENT for a family that does not exist (nor could be loaded).
            ENOENT => KernelError::Unsupported(format!(
                "{what}: the generic netlink family \"wireguard\" does not exist ({os}); the wireguard module is not \
                 loaded and could not be loaded"
            )),
            ENODEV => failed(
                interface,
                format!(
                    "{what}: the link no longer exists ({os}); was it deleted by another program? Restart the agent \
                     to create it again"
                ),
            ),
            EPERM | EACCES => failed(
                interface,
                format!(
                    "{what} was refused ({os}); the agent needs CAP_NET_ADMIN: run it as root or grant it that capability"
                ),
            ),
            _ => failed(interface, format!("{what} failed: {os}")),
        }
    }
}

/// One peer's part of a set request, before it is split over messages.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PeerChange {
    key: Key,
    flags: WireguardPeerFlags,
    endpoint: Option<SocketAddr>,
    persistent_keepalive: Option<u16>,
    allowed_ips: Vec<IpNet>,
}

impl PeerChange {
    /// The attributes before the allowed IPs: all of them in the first part, only the public key
    /// and `WGPEER_F_UPDATE_ONLY` in a continuation (whose allowed IPs are appended).
    fn attributes(&self, first: bool) -> Vec<WireguardPeerAttribute> {
        let mut attributes = vec![WireguardPeerAttribute::PublicKey(*self.key.as_bytes())];
        let flags = if first { self.flags } else { self.flags & WireguardPeerFlags::UpdateOnly };
        if !flags.is_empty() {
            attributes.push(WireguardPeerAttribute::Flags(flags));
        }
        if first {
            if let Some(endpoint) = self.endpoint {
                attributes.push(WireguardPeerAttribute::Endpoint(endpoint));
            }
            if let Some(keepalive) = self.persistent_keepalive {
                attributes.push(WireguardPeerAttribute::PersistentKeepalive(keepalive));
            }
        }
        attributes
    }
}

/// The peers a plan touches, in the order they are sent: removals, changes, additions.
fn peer_changes(plan: &DevicePlan) -> Vec<PeerChange> {
    let removals = plan.remove.iter().map(|key| PeerChange {
        key: *key,
        flags: WireguardPeerFlags::RemoveMe,
        endpoint: None,
        persistent_keepalive: None,
        allowed_ips: Vec::new(),
    });
    let updates = plan.update.iter().map(|update| {
        let mut flags = WireguardPeerFlags::UpdateOnly;
        if update.allowed_ips.is_some() {
            flags |= WireguardPeerFlags::ReplaceAllowedIps;
        }
        PeerChange {
            key: update.public_key,
            flags,
            endpoint: update.endpoint,
            persistent_keepalive: update.persistent_keepalive,
            allowed_ips: update.allowed_ips.iter().flatten().copied().collect(),
        }
    });
    let additions = plan.add.iter().map(|(key, config)| PeerChange {
        key: *key,
        flags: WireguardPeerFlags::ReplaceAllowedIps,
        endpoint: config.endpoint,
        persistent_keepalive: config.persistent_keepalive,
        allowed_ips: config.allowed_ips.iter().copied().collect(),
    });
    removals.chain(updates).chain(additions).collect()
}

fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
    let family = match net {
        IpNet::V4(_) => WireguardAddressFamily::Ipv4,
        IpNet::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.addr()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

fn private_key_bytes(key: &PrivateKey) -> Result<[u8; 32], KeyError> {
    Key::from_hex(&key.to_hex()).map(|key| *key.as_bytes())
}

/// The attributes of the `WG_CMD_SET_DEVICE` messages that apply `plan`, each message at most
/// [`MAX_MESSAGE_LEN`] bytes; none for an empty plan.
fn set_messages(interface: &str, plan: &DevicePlan) -> Result<Vec<Vec<WireguardAttribute>>, KernelError> {
    set_messages_within(interface, plan, MAX_MESSAGE_LEN)
}

fn set_messages_within(
    interface: &str,
    plan: &DevicePlan,
    max_len: usize,
) -> Result<Vec<Vec<WireguardAttribute>>, KernelError> {
    if plan.is_empty() {
        return Ok(Vec::new());
    }
    let mut head = vec![WireguardAttribute::IfName(interface.to_owned())];
    if let Some(key) = &plan.private_key {
        let bytes = private_key_bytes(key)
            .map_err(|err| failed(interface, format!("encoding the private key failed (a bug): {err}")))?;
        head.push(WireguardAttribute::PrivateKey(bytes));
    }
    if let Some(port) = plan.listen_port {
        head.push(WireguardAttribute::ListenPort(port));
    }
    let mut messages = Splitter::new(interface, head, max_len);
    for change in peer_changes(plan) {
        messages.push(&change);
    }
    Ok(messages.finish())
}

/// Packs peers into messages of at most `max_len` bytes. A peer is moved whole to the next
/// message when it does not fit; only a peer that does not fit in an empty message is split.
struct Splitter {
    interface: String,
    max_len: usize,
    messages: Vec<Vec<WireguardAttribute>>,
    head: Vec<WireguardAttribute>,
    peers: Vec<WireguardPeer>,
    /// The length of the current message so far (without the header of the peers' nest).
    len: usize,
    /// Whether the current message has anything to send.
    pending: bool,
}

impl Splitter {
    fn new(interface: &str, head: Vec<WireguardAttribute>, max_len: usize) -> Self {
        let len = HEADERS_LEN + head.as_slice().buffer_len();
        let pending = head.len() > 1;
        Self { interface: interface.to_owned(), max_len, messages: Vec::new(), head, peers: Vec::new(), len, pending }
    }

    /// The message length with `extra` more bytes of peers.
    fn len_with(&self, extra: usize) -> usize {
        self.len + extra + if self.peers.is_empty() { NLA_HEADER_LEN } else { 0 }
    }

    fn push(&mut self, change: &PeerChange) {
        let all_ips: Vec<WireguardAllowedIp> = change.allowed_ips.iter().map(allowed_ip).collect();
        let mut ips = all_ips.as_slice();
        let mut first = true;
        loop {
            let attributes = change.attributes(first);
            let base = NLA_HEADER_LEN + attributes.as_slice().buffer_len();
            // How many allowed IPs fit after the peer's other attributes (and the nest around them).
            let mut fitting = 0;
            let mut len = self.len_with(base) + NLA_HEADER_LEN;
            for ip in ips {
                len += ip.buffer_len();
                if len > self.max_len {
                    break;
                }
                fitting += 1;
            }
            let whole = fitting == ips.len() && self.len_with(base) <= self.max_len;
            if !whole && !self.peers.is_empty() {
                self.flush();
                continue;
            }
            // An empty message takes at least one allowed IP, so that every round makes progress.
            let take = if whole { fitting } else { fitting.max(1).min(ips.len()) };
            let (now, rest) = ips.split_at(take);
            self.add(attributes, now);
            ips = rest;
            if ips.is_empty() {
                return;
            }
            self.flush();
            first = false;
        }
    }

    fn add(&mut self, mut attributes: Vec<WireguardPeerAttribute>, ips: &[WireguardAllowedIp]) {
        if !ips.is_empty() {
            attributes.push(WireguardPeerAttribute::AllowedIps(ips.to_vec()));
        }
        let peer = WireguardPeer(attributes);
        self.len = self.len_with(peer.buffer_len());
        self.peers.push(peer);
        self.pending = true;
    }

    fn flush(&mut self) {
        if !self.pending {
            return;
        }
        let next_head = vec![WireguardAttribute::IfName(self.interface.clone())];
        self.len = HEADERS_LEN + next_head.as_slice().buffer_len();
        let mut message = std::mem::replace(&mut self.head, next_head);
        if !self.peers.is_empty() {
            message.push(WireguardAttribute::Peers(std::mem::take(&mut self.peers)));
        }
        self.messages.push(message);
        self.pending = false;
    }

    fn finish(mut self) -> Vec<Vec<WireguardAttribute>> {
        self.flush();
        self.messages
    }
}

/// The device described by the messages of one `WG_CMD_GET_DEVICE` dump. Peers that appear in
/// several messages (the kernel continues a peer whose allowed IPs did not fit) are merged.
fn device_from_dump(parts: impl IntoIterator<Item = Vec<WireguardAttribute>>) -> Result<DeviceState, String> {
    let mut device = DeviceState::default();
    for attributes in parts {
        for attribute in attributes {
            match attribute {
                WireguardAttribute::PrivateKey(bytes) if bytes != [0; 32] => {
                    device.private_key = Some(PrivateKey::from_bytes(bytes));
                }
                WireguardAttribute::ListenPort(port) => device.listen_port = (port != 0).then_some(port),
                WireguardAttribute::Peers(peers) => {
                    for peer in peers {
                        merge_peer(&mut device.peers, peer)?;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(device)
}

fn merge_peer(peers: &mut BTreeMap<Key, PeerState>, peer: WireguardPeer) -> Result<(), String> {
    let key = peer
        .iter()
        .find_map(|attribute| match attribute {
            WireguardPeerAttribute::PublicKey(bytes) => Some(Key::from_bytes(*bytes)),
            _ => None,
        })
        .ok_or("a peer without WGPEER_A_PUBLIC_KEY")?;
    let state = peers.entry(key).or_default();
    for attribute in peer.0 {
        match attribute {
            WireguardPeerAttribute::Endpoint(endpoint) => state.config.endpoint = Some(endpoint),
            WireguardPeerAttribute::PersistentKeepalive(secs) => {
                state.config.persistent_keepalive = (secs != 0).then_some(secs);
            }
            WireguardPeerAttribute::LastHandshake(time) => state.last_handshake = handshake_time(time),
            WireguardPeerAttribute::RxBytes(bytes) => state.rx_bytes = bytes,
            WireguardPeerAttribute::TxBytes(bytes) => state.tx_bytes = bytes,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in &ips {
                    state.config.allowed_ips.insert(net_of(ip).map_err(|why| format!("peer {key}: {why}"))?);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The kernel's `timespec64` of the last handshake; zero means never.
fn handshake_time(time: WireguardTimeSpec) -> Option<SystemTime> {
    if time.seconds == 0 && time.nano_seconds == 0 {
        return None;
    }
    let seconds = u64::try_from(time.seconds).ok()?;
    let nanos = u32::try_from(time.nano_seconds).ok().filter(|nanos| *nanos < 1_000_000_000)?;
    UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

fn net_of(ip: &WireguardAllowedIp) -> Result<IpNet, String> {
    let mut addr = None;
    let mut prefix = None;
    for attribute in ip.iter() {
        match attribute {
            WireguardAllowedIpAttr::IpAddr(value) => addr = Some(*value),
            WireguardAllowedIpAttr::Cidr(value) => prefix = Some(*value),
            _ => {}
        }
    }
    match (addr, prefix) {
        (Some(addr), Some(prefix)) => {
            IpNet::new(addr, prefix).map_err(|_| format!("allowed IP {addr}/{prefix} has an invalid prefix length"))
        }
        _ => Err("an allowed IP without WGALLOWEDIP_A_IPADDR or WGALLOWEDIP_A_CIDR_MASK".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::process::Command;

    use mesh_wireguard::device::applied;
    use mesh_wireguard::{DeviceConfig, PeerConfig, PeerUpdate, plan};
    use proptest::collection::{btree_map, btree_set};
    use proptest::prelude::*;

    use super::*;

    const IFACE: &str = "wg-harness";

    fn key(n: u8) -> Key {
        Key::from_bytes([n; 32])
    }

    fn nets(list: &[&str]) -> BTreeSet<IpNet> {
        list.iter().map(|net| net.parse().unwrap()).collect()
    }

    fn peer_config(ips: &[&str], endpoint: Option<&str>, keepalive: Option<u16>) -> PeerConfig {
        PeerConfig {
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: nets(ips),
            persistent_keepalive: keepalive,
        }
    }

    /// The peers of a message, in order.
    fn peers_of(message: &[WireguardAttribute]) -> Vec<WireguardPeer> {
        message
            .iter()
            .filter_map(|a| match a {
                WireguardAttribute::Peers(peers) => Some(peers.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn flags_of(peer: &WireguardPeer) -> Option<WireguardPeerFlags> {
        peer.iter().find_map(|a| match a {
            WireguardPeerAttribute::Flags(flags) => Some(*flags),
            _ => None,
        })
    }

    fn key_of(peer: &WireguardPeer) -> Key {
        peer.iter()
            .find_map(|a| match a {
                WireguardPeerAttribute::PublicKey(bytes) => Some(Key::from_bytes(*bytes)),
                _ => None,
            })
            .unwrap()
    }

    fn ips_of(peer: &WireguardPeer) -> Vec<IpNet> {
        peer.iter()
            .filter_map(|a| match a {
                WireguardPeerAttribute::AllowedIps(ips) => {
                    Some(ips.iter().map(|ip| net_of(ip).unwrap()).collect::<Vec<_>>())
                }
                _ => None,
            })
            .flatten()
            .collect::<Vec<_>>()
    }

    /// Encodes a message the way it goes to the kernel and decodes it again: checks that the
    /// attributes survive the wire format, and returns the encoded length.
    fn through_the_wire(attributes: Vec<WireguardAttribute>) -> (Vec<WireguardAttribute>, usize) {
        let mut genl = GenlMessage::from_payload(WireguardMessage { cmd: WireguardCmd::SetDevice, attributes });
        genl.set_resolved_family_id(0x20);
        let mut message = NetlinkMessage::from(genl);
        message.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        let parsed = NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(&bytes).unwrap();
        let NetlinkPayload::InnerMessage(genl) = parsed.payload else { panic!("not a generic netlink message") };
        (genl.payload.attributes, bytes.len())
    }

    /// What the kernel does with a `WG_CMD_SET_DEVICE` (drivers/net/wireguard/netlink.c),
    /// minus the allowed-IPs trie (an address is not taken from another peer).
    fn kernel_set(device: &mut DeviceState, message: &[WireguardAttribute]) {
        for attribute in message {
            match attribute {
                WireguardAttribute::PrivateKey(bytes) => device.private_key = Some(PrivateKey::from_bytes(*bytes)),
                WireguardAttribute::ListenPort(port) => device.listen_port = Some(*port),
                WireguardAttribute::Peers(peers) => {
                    for peer in peers {
                        let key = key_of(peer);
                        let flags = flags_of(peer).unwrap_or(WireguardPeerFlags::empty());
                        let absent = !device.peers.contains_key(&key);
                        if absent && flags.intersects(WireguardPeerFlags::RemoveMe | WireguardPeerFlags::UpdateOnly) {
                            continue;
                        }
                        device.peers.entry(key).or_default();
                        if flags.contains(WireguardPeerFlags::RemoveMe) {
                            device.peers.remove(&key);
                            continue;
                        }
                        let state = device.peers.get_mut(&key).unwrap();
                        if flags.contains(WireguardPeerFlags::ReplaceAllowedIps) {
                            state.config.allowed_ips.clear();
                        }
                        for attribute in peer.iter() {
                            match attribute {
                                WireguardPeerAttribute::Endpoint(e) => state.config.endpoint = Some(*e),
                                WireguardPeerAttribute::PersistentKeepalive(k) => {
                                    state.config.persistent_keepalive = (*k != 0).then_some(*k);
                                }
                                _ => {}
                            }
                        }
                        state.config.allowed_ips.extend(ips_of(peer));
                    }
                }
                _ => {}
            }
        }
    }

    /// A dump as the kernel writes it: device attributes in the first message, each peer's
    /// allowed IPs in parts of `ips_per_part` (a continuation repeats only the public key), and
    /// `parts_per_message` peer parts per message.
    fn kernel_dump(
        device: &DeviceState,
        ips_per_part: usize,
        parts_per_message: usize,
    ) -> Vec<Vec<WireguardAttribute>> {
        let mut parts = Vec::new();
        for (key, peer) in &device.peers {
            let ips: Vec<_> = peer.config.allowed_ips.iter().map(allowed_ip).collect();
            let mut chunks: Vec<&[WireguardAllowedIp]> = ips.chunks(ips_per_part).collect();
            if chunks.is_empty() {
                chunks.push(&[]);
            }
            for (i, chunk) in chunks.into_iter().enumerate() {
                let mut attributes = vec![WireguardPeerAttribute::PublicKey(*key.as_bytes())];
                if i == 0 {
                    let since_epoch = peer.last_handshake.map(|t| t.duration_since(UNIX_EPOCH).unwrap());
                    attributes.extend([
                        WireguardPeerAttribute::PresharedKey([0; 32]),
                        WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                            seconds: since_epoch.map_or(0, |d| d.as_secs() as i64),
                            nano_seconds: since_epoch.map_or(0, |d| i64::from(d.subsec_nanos())),
                        }),
                        WireguardPeerAttribute::PersistentKeepalive(peer.config.persistent_keepalive.unwrap_or(0)),
                        WireguardPeerAttribute::TxBytes(peer.tx_bytes),
                        WireguardPeerAttribute::RxBytes(peer.rx_bytes),
                        WireguardPeerAttribute::ProtocolVersion(1),
                    ]);
                    if let Some(endpoint) = peer.config.endpoint {
                        attributes.push(WireguardPeerAttribute::Endpoint(endpoint));
                    }
                }
                if !chunk.is_empty() {
                    attributes.push(WireguardPeerAttribute::AllowedIps(chunk.to_vec()));
                }
                parts.push(WireguardPeer(attributes));
            }
        }
        let mut first = vec![
            WireguardAttribute::ListenPort(device.listen_port.unwrap_or(0)),
            WireguardAttribute::Fwmark(0),
            WireguardAttribute::IfIndex(7),
            WireguardAttribute::IfName(IFACE.into()),
        ];
        if let Some(private) = &device.private_key {
            first.push(WireguardAttribute::PrivateKey(private_key_bytes(private).unwrap()));
            first.push(WireguardAttribute::PublicKey(*private.public_key().as_bytes()));
        }
        let mut messages = vec![first];
        for (i, chunk) in parts.chunks(parts_per_message).enumerate() {
            if i > 0 {
                messages.push(vec![WireguardAttribute::IfIndex(7), WireguardAttribute::IfName(IFACE.into())]);
            }
            messages.last_mut().unwrap().push(WireguardAttribute::Peers(chunk.to_vec()));
        }
        messages
    }

    #[test]
    fn a_fresh_device_gets_key_port_and_peers_in_one_message() {
        let private = PrivateKey::from_bytes([9; 32]);
        let plan = DevicePlan {
            private_key: Some(private.clone()),
            listen_port: Some(51820),
            add: vec![
                (key(1), peer_config(&["10.42.0.1/32", "10.42.7.7/32"], Some("192.168.77.1:51820"), Some(25))),
                (key(2), peer_config(&["fd42::2/128"], None, None)),
            ],
            ..DevicePlan::default()
        };
        let messages = set_messages(IFACE, &plan).unwrap();
        assert_eq!(messages.len(), 1);
        let ip = |net: &str| allowed_ip(&net.parse().unwrap());
        assert_eq!(
            messages[0],
            vec![
                WireguardAttribute::IfName(IFACE.into()),
                WireguardAttribute::PrivateKey(private_key_bytes(&private).unwrap()),
                WireguardAttribute::ListenPort(51820),
                WireguardAttribute::Peers(vec![
                    WireguardPeer(vec![
                        WireguardPeerAttribute::PublicKey([1; 32]),
                        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
                        WireguardPeerAttribute::Endpoint("192.168.77.1:51820".parse().unwrap()),
                        WireguardPeerAttribute::PersistentKeepalive(25),
                        WireguardPeerAttribute::AllowedIps(vec![ip("10.42.0.1/32"), ip("10.42.7.7/32")]),
                    ]),
                    WireguardPeer(vec![
                        WireguardPeerAttribute::PublicKey([2; 32]),
                        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
                        WireguardPeerAttribute::AllowedIps(vec![ip("fd42::2/128")]),
                    ]),
                ]),
            ]
        );
        // The private key is the one given, byte for byte.
        assert_eq!(Key::from_bytes(private_key_bytes(&private).unwrap()).to_hex(), private.to_hex());
    }

    #[test]
    fn flags_and_fields_follow_the_kind_of_change() {
        let plan = DevicePlan {
            remove: vec![key(1)],
            update: vec![
                PeerUpdate { endpoint: Some("192.168.77.2:4000".parse().unwrap()), ..PeerUpdate::new(key(2)) },
                PeerUpdate { allowed_ips: Some(BTreeSet::new()), ..PeerUpdate::new(key(3)) },
                PeerUpdate { persistent_keepalive: Some(0), ..PeerUpdate::new(key(4)) },
                PeerUpdate { allowed_ips: Some(nets(&["10.42.0.5/32"])), ..PeerUpdate::new(key(5)) },
            ],
            add: vec![(key(6), peer_config(&[], None, None))],
            ..DevicePlan::default()
        };
        let messages = set_messages(IFACE, &plan).unwrap();
        assert_eq!(messages.len(), 1);
        // No private key or listen port when the plan has none.
        assert!(
            messages[0]
                .iter()
                .all(|a| !matches!(a, WireguardAttribute::PrivateKey(_) | WireguardAttribute::ListenPort(_)))
        );
        let peers = peers_of(&messages[0]);
        let update_only = WireguardPeerFlags::UpdateOnly;
        let replace = WireguardPeerFlags::ReplaceAllowedIps;
        assert_eq!(
            peers,
            vec![
                WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey([1; 32]),
                    WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
                ]),
                WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey([2; 32]),
                    WireguardPeerAttribute::Flags(update_only),
                    WireguardPeerAttribute::Endpoint("192.168.77.2:4000".parse().unwrap()),
                ]),
                // Emptied allowed IPs: the flag alone clears them.
                WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey([3; 32]),
                    WireguardPeerAttribute::Flags(update_only | replace),
                ]),
                // Keepalive turned off is sent as 0.
                WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey([4; 32]),
                    WireguardPeerAttribute::Flags(update_only),
                    WireguardPeerAttribute::PersistentKeepalive(0),
                ]),
                WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey([5; 32]),
                    WireguardPeerAttribute::Flags(update_only | replace),
                    WireguardPeerAttribute::AllowedIps(vec![allowed_ip(&"10.42.0.5/32".parse().unwrap())]),
                ]),
                WireguardPeer(
                    vec![WireguardPeerAttribute::PublicKey([6; 32]), WireguardPeerAttribute::Flags(replace),]
                ),
            ]
        );
    }

    #[test]
    fn an_empty_plan_sends_nothing() {
        assert!(set_messages(IFACE, &DevicePlan::default()).unwrap().is_empty());
    }

    #[test]
    fn only_a_listen_port_is_one_small_message() {
        let plan = DevicePlan { listen_port: Some(51821), ..DevicePlan::default() };
        assert_eq!(
            set_messages(IFACE, &plan).unwrap(),
            vec![vec![WireguardAttribute::IfName(IFACE.into()), WireguardAttribute::ListenPort(51821)]]
        );
    }

    #[test]
    fn many_peers_are_split_into_messages_that_fit_and_keep_each_peer_whole() {
        let add: Vec<_> = (0..600u16)
            .map(|n| {
                let [hi, lo] = n.to_be_bytes();
                let ips = [format!("10.42.{hi}.{lo}/32"), format!("10.43.{hi}.{lo}/32")];
                let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
                let mut bytes = [0u8; 32];
                bytes[..2].copy_from_slice(&n.to_be_bytes());
                (Key::from_bytes(bytes), peer_config(&ips, Some("192.168.77.1:51820"), Some(25)))
            })
            .collect();
        let plan = DevicePlan {
            private_key: Some(PrivateKey::from_bytes([9; 32])),
            listen_port: Some(51820),
            add: add.clone(),
            ..DevicePlan::default()
        };
        let messages = set_messages(IFACE, &plan).unwrap();
        assert!(messages.len() > 10, "{} messages", messages.len());
        let mut sent = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            assert_eq!(message[0], WireguardAttribute::IfName(IFACE.into()));
            let has_key = message.iter().any(|a| matches!(a, WireguardAttribute::PrivateKey(_)));
            assert_eq!(has_key, i == 0, "the private key goes in the first message only");
            let (decoded, len) = through_the_wire(message.clone());
            assert_eq!(&decoded, message);
            assert!(len <= MAX_MESSAGE_LEN, "message {i} is {len} bytes");
            // Full enough: the next peer would not have fit.
            if i + 1 < messages.len() {
                let next = peers_of(&messages[i + 1])[0].buffer_len();
                assert!(len + next > MAX_MESSAGE_LEN, "message {i} ({len} bytes) had room for {next} more");
            }
            sent.extend(peers_of(message));
        }
        // Every peer exactly once, whole, in order.
        assert_eq!(sent.len(), add.len());
        for (peer, (key, config)) in sent.iter().zip(&add) {
            assert_eq!(key_of(peer), *key);
            assert_eq!(flags_of(peer), Some(WireguardPeerFlags::ReplaceAllowedIps));
            assert_eq!(ips_of(peer), config.allowed_ips.iter().copied().collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_peer_with_too_many_allowed_ips_continues_in_the_next_message() {
        let many: BTreeSet<IpNet> =
            (0..300u32).map(|n| IpNet::from(ipnet::Ipv4Net::from(std::net::Ipv4Addr::from(0x0a2a_0000 + n)))).collect();
        let plan = DevicePlan {
            add: vec![(
                key(1),
                PeerConfig { allowed_ips: many.clone(), ..peer_config(&[], Some("192.168.77.1:1"), Some(25)) },
            )],
            update: vec![PeerUpdate { allowed_ips: Some(many.clone()), ..PeerUpdate::new(key(2)) }],
            ..DevicePlan::default()
        };
        let messages = set_messages(IFACE, &plan).unwrap();
        assert!(messages.len() >= 4, "{} messages", messages.len());
        let mut parts: BTreeMap<Key, Vec<WireguardPeer>> = BTreeMap::new();
        for message in &messages {
            assert!(through_the_wire(message.clone()).1 <= MAX_MESSAGE_LEN);
            for peer in peers_of(message) {
                parts.entry(key_of(&peer)).or_default().push(peer);
            }
        }
        for (key, expected_first, expected_rest) in [
            (key(1), WireguardPeerFlags::ReplaceAllowedIps, None),
            (
                key(2),
                WireguardPeerFlags::UpdateOnly | WireguardPeerFlags::ReplaceAllowedIps,
                Some(WireguardPeerFlags::UpdateOnly),
            ),
        ] {
            let parts = &parts[&key];
            assert!(parts.len() > 1);
            // Only the first part replaces; the continuations append, and repeat nothing else.
            assert_eq!(flags_of(&parts[0]), Some(expected_first));
            for part in &parts[1..] {
                assert_eq!(flags_of(part), expected_rest);
                assert!(part.iter().all(|a| !matches!(
                    a,
                    WireguardPeerAttribute::Endpoint(_) | WireguardPeerAttribute::PersistentKeepalive(_)
                )));
            }
            let sent: Vec<IpNet> = parts.iter().flat_map(ips_of).collect();
            assert_eq!(sent, many.iter().copied().collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_dump_over_several_messages_is_merged_by_key() {
        let handshake = UNIX_EPOCH + Duration::new(1_700_000_000, 500);
        let device = DeviceState {
            private_key: Some(PrivateKey::from_bytes([9; 32])),
            listen_port: Some(51820),
            peers: [
                (
                    key(1),
                    PeerState {
                        config: peer_config(
                            &["10.42.0.1/32", "10.42.7.7/32", "10.42.7.8/32"],
                            Some("192.168.77.1:51820"),
                            Some(25),
                        ),
                        last_handshake: Some(handshake),
                        rx_bytes: 2000,
                        tx_bytes: 1000,
                    },
                ),
                (
                    key(2),
                    PeerState {
                        config: peer_config(&["fd42::2/128"], Some("[fd00::2]:51820"), None),
                        ..PeerState::default()
                    },
                ),
                (key(3), PeerState { config: peer_config(&[], None, None), ..PeerState::default() }),
            ]
            .into(),
        };
        let dump = kernel_dump(&device, 1, 2);
        assert!(dump.len() > 2, "the dump is split: {} messages", dump.len());
        let parsed = device_from_dump(dump.into_iter().map(|m| through_the_wire(m).0)).unwrap();
        assert_eq!(parsed, device);
        assert_eq!(parsed.peers[&key(1)].last_handshake, Some(handshake));
        assert_eq!(parsed.peers[&key(2)].last_handshake, None, "a zero timespec is never");
        assert_eq!(parsed.peers[&key(2)].config.persistent_keepalive, None, "keepalive 0 is off");
    }

    #[test]
    fn a_device_without_key_or_port_reads_as_none() {
        let dump = vec![vec![WireguardAttribute::ListenPort(0), WireguardAttribute::IfName(IFACE.into())]];
        assert_eq!(device_from_dump(dump).unwrap(), DeviceState::default());
    }

    #[test]
    fn malformed_dumps_are_refused_with_what_is_wrong() {
        let keyless =
            vec![vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![WireguardPeerAttribute::RxBytes(1)])])]];
        assert!(device_from_dump(keyless).unwrap_err().contains("WGPEER_A_PUBLIC_KEY"));
        let maskless = vec![vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey([1; 32]),
            WireguardPeerAttribute::AllowedIps(vec![WireguardAllowedIp(vec![WireguardAllowedIpAttr::IpAddr(
                "10.42.0.1".parse().unwrap(),
            )])]),
        ])])]];
        assert!(device_from_dump(maskless).unwrap_err().contains("CIDR"));
        let wide = vec![vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey([1; 32]),
            WireguardPeerAttribute::AllowedIps(vec![WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::IpAddr("10.42.0.1".parse().unwrap()),
                WireguardAllowedIpAttr::Cidr(33),
            ])]),
        ])])]];
        assert!(device_from_dump(wide).unwrap_err().contains("10.42.0.1/33"));
    }

    #[test]
    fn handshake_times_convert_and_odd_ones_are_never() {
        let at = |seconds, nano_seconds| handshake_time(WireguardTimeSpec { seconds, nano_seconds });
        assert_eq!(at(0, 0), None);
        assert_eq!(at(1, 2), Some(UNIX_EPOCH + Duration::new(1, 2)));
        assert_eq!(at(0, 5), Some(UNIX_EPOCH + Duration::new(0, 5)));
        assert_eq!(at(-1, 0), None);
        assert_eq!(at(1, 1_000_000_000), None);
    }

    #[test]
    fn only_the_kernel_lacking_wireguard_or_a_userspace_link_falls_back() {
        assert!(KernelError::Unsupported("x".into()).is_unsupported());
        assert!(KernelError::UserspaceLink { interface: IFACE.into() }.is_unsupported());
        assert!(!failed(IFACE, "EPERM").is_unsupported());
        assert!(check_kind(IFACE, Some(InfoKind::Wireguard)).is_ok());
        assert!(check_kind(IFACE, Some(InfoKind::Tun)).unwrap_err().is_unsupported());
        let veth = check_kind(IFACE, Some(InfoKind::Veth)).unwrap_err();
        assert!(!veth.is_unsupported());
        assert!(veth.to_string().contains("kind veth"), "{veth}");
        assert!(!check_kind(IFACE, None).unwrap_err().is_unsupported());
    }

    #[test]
    fn interface_names_the_kernel_refuses_are_refused_first() {
        assert!(check_name(IFACE).is_ok());
        assert!(check_name("wg0").is_ok());
        for bad in ["", "sixteen-chars-xx", "a/b", "a b", "a:b", ".", ".."] {
            let err = check_name(bad).unwrap_err();
            assert!(!err.is_unsupported());
            assert!(err.to_string().contains("not a valid interface name"), "{err}");
        }
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u16>(), 24u8..=32).prop_map(|(n, prefix)| {
                let [a, b] = n.to_be_bytes();
                IpNet::new(std::net::Ipv4Addr::new(10, 42, a, b).into(), prefix).unwrap().trunc()
            }),
            (any::<u16>(), 64u8..=128).prop_map(|(n, prefix)| {
                IpNet::new(std::net::Ipv6Addr::new(0xfd42, 0, 0, 0, 0, 0, 0, n).into(), prefix).unwrap().trunc()
            }),
        ]
    }

    fn arb_endpoint() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (1u8..4, 1u16..4).prop_map(|(h, p)| SocketAddr::from(([192, 168, 77, h], p))),
            (1u16..4, 1u16..4)
                .prop_map(|(h, p)| SocketAddr::from((std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, h), p))),
        ]
    }

    fn arb_peer() -> impl Strategy<Value = PeerConfig> {
        (proptest::option::of(arb_endpoint()), btree_set(arb_net(), 0..40), proptest::option::of(0u16..3)).prop_map(
            |(endpoint, allowed_ips, persistent_keepalive)| PeerConfig { endpoint, allowed_ips, persistent_keepalive },
        )
    }

    fn arb_config() -> impl Strategy<Value = DeviceConfig> {
        (0u8..3, 1u16..3, btree_map((0u8..30).prop_map(key), arb_peer(), 0..20)).prop_map(|(k, port, peers)| {
            DeviceConfig { private_key: PrivateKey::from_bytes([k; 32]), listen_port: port, peers }
        })
    }

    fn arb_state() -> impl Strategy<Value = DeviceState> {
        (
            proptest::option::of((0u8..3).prop_map(|k| PrivateKey::from_bytes([k; 32]))),
            proptest::option::of(1u16..3),
            btree_map(
                (0u8..30).prop_map(key),
                (
                    arb_peer(),
                    proptest::option::of((1u64..2_000_000_000, 0u32..1_000_000_000)),
                    any::<u64>(),
                    any::<u64>(),
                ),
                0..20,
            ),
        )
            .prop_map(|(private_key, listen_port, peers)| DeviceState {
                private_key,
                listen_port,
                peers: peers
                    .into_iter()
                    .map(|(key, (mut config, handshake, rx_bytes, tx_bytes))| {
                        config.persistent_keepalive = config.persistent_keepalive.filter(|k| *k != 0);
                        let last_handshake = handshake.map(|(s, n)| UNIX_EPOCH + Duration::new(s, n));
                        (key, PeerState { config, last_handshake, rx_bytes, tx_bytes })
                    })
                    .collect(),
            })
    }

    proptest! {
        /// Sending the messages of a plan to (a model of) the kernel gives the device the plan
        /// promises, however small the messages have to be, and every message fits.
        #[test]
        fn the_messages_of_a_plan_give_the_planned_device(
            before in arb_state(),
            after in arb_config(),
            max_len in 256usize..=MAX_MESSAGE_LEN,
        ) {
            let plan = plan(&before, &after);
            let messages = set_messages_within(IFACE, &plan, max_len).unwrap();
            prop_assert_eq!(messages.is_empty(), plan.is_empty());
            let mut device = before.clone();
            for message in &messages {
                let (decoded, len) = through_the_wire(message.clone());
                prop_assert!(len <= max_len, "{} bytes > {}", len, max_len);
                kernel_set(&mut device, &decoded);
            }
            prop_assert_eq!(&device, &applied(&before, &plan));
            prop_assert!(mesh_wireguard::plan(&device, &after).is_empty());
        }

        /// A device read from a dump, however the kernel splits it, is the device.
        #[test]
        fn a_dump_reads_back_as_the_device(device in arb_state(), ips_per_part in 1usize..8, parts_per_message in 1usize..5) {
            let dump = kernel_dump(&device, ips_per_part, parts_per_message);
            let parsed = device_from_dump(dump.into_iter().map(|m| through_the_wire(m).0)).unwrap();
            prop_assert_eq!(parsed, device);
        }
    }

    /// Set in the child process that runs inside a fresh network namespace.
    const NETNS_CHILD: &str = "MESH_AGENT_KERNEL_TEST_IN_NETNS";
    /// Set (to 1) where the kernel is known to have WireGuard (the lab's VM nodes): `Unsupported`
    /// is then a failure, not the expected answer of a kernel without the module.
    const REQUIRE_KERNEL: &str = "MESH_REQUIRE_KERNEL_WG";

    fn kernel_required() -> bool {
        std::env::var(REQUIRE_KERNEL).is_ok_and(|v| v == "1")
    }
    const NETNS_RESULT: &str = "kernel-netns-result:";

    /// `open` in a fresh network namespace (made with unshare(1); the test re-runs itself there):
    /// on a kernel without WireGuard it must say `Unsupported` and leave no link behind; on one
    /// with it, the link must be created and must read, take a plan and read back as planned.
    /// Either way a tun device is left to userspace and `lo` is refused without a fallback.
    #[test]
    fn open_in_a_fresh_network_namespace() {
        if std::env::var_os(NETNS_CHILD).is_some() {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let result = runtime.block_on(in_the_namespace());
            println!("{NETNS_RESULT} {result}");
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let module = module_path!();
        let test = format!("{}::open_in_a_fresh_network_namespace", module.split_once("::").map_or(module, |(_, m)| m));
        for unshare in [&["--net"][..], &["--user", "--map-root-user", "--net"][..]] {
            let output = match Command::new("unshare")
                .args(unshare)
                .arg(&exe)
                .args([test.as_str(), "--exact", "--nocapture", "--test-threads=1"])
                .env(NETNS_CHILD, "1")
                .output()
            {
                Ok(output) => output,
                Err(err) => panic!("unshare(1) cannot be run here (install util-linux): {err}"),
            };
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            if let Some(line) = stdout.lines().find_map(|l| l.find(NETNS_RESULT).map(|at| &l[at..])) {
                assert!(output.status.success(), "{stdout}\n{stderr}");
                eprintln!("{line}");
                return;
            }
            if stderr.starts_with("unshare:") {
                eprintln!("no namespace with `unshare {}`: {stderr}", unshare.join(" "));
                continue;
            }
            panic!("the test in the namespace failed or did not run ({}):\n{stdout}\n{stderr}", output.status);
        }
        panic!("no network namespace can be made here: run the tests as root, or allow unprivileged user namespaces");
    }

    async fn link_exists(name: &str) -> bool {
        let (connection, handle, _) = rtnetlink::new_connection().unwrap();
        let _connection = AbortOnDrop(tokio::spawn(connection));
        link_kind(&handle, name).await.unwrap().is_some()
    }

    async fn in_the_namespace() -> String {
        // A link without a kind is never taken, on any kernel.
        let lo = KernelDevice::open("lo").await.unwrap_err();
        assert!(matches!(lo, KernelError::Failed { .. }), "{lo}");
        eprintln!("{lo}");
        // A tun device (wireguard-go's) is left to userspace, on any kernel.
        match Command::new("ip").args(["tuntap", "add", "dev", "wg-tun", "mode", "tun"]).output() {
            Ok(output) if output.status.success() => {
                let tun = KernelDevice::open("wg-tun").await.unwrap_err();
                assert!(matches!(tun, KernelError::UserspaceLink { .. }), "{tun}");
                eprintln!("{tun}");
            }
            other => eprintln!("no tun device to check: {other:?}"),
        }

        let device = match KernelDevice::open(IFACE).await {
            Err(KernelError::Unsupported(why)) => {
                assert!(!kernel_required(), "{REQUIRE_KERNEL}=1, but the kernel backend says: {why}");
                eprintln!("{}", KernelError::Unsupported(why.clone()));
                assert!(!link_exists(IFACE).await, "nothing is left behind: {why}");
                return "unsupported".into();
            }
            Err(err) => panic!("{err}"),
            Ok(device) => device,
        };
        assert!(link_exists(IFACE).await);
        let fresh = device.get().await.unwrap();
        assert_eq!(fresh.private_key, None);
        assert!(fresh.peers.is_empty());

        let many: BTreeSet<IpNet> =
            (0..300u32).map(|n| IpNet::from(ipnet::Ipv4Net::from(std::net::Ipv4Addr::from(0x0a2b_0000 + n)))).collect();
        let mut desired = DeviceConfig {
            private_key: PrivateKey::from_bytes([9; 32]),
            listen_port: 51820,
            peers: [
                (key(1), peer_config(&["10.42.0.1/32"], Some("192.168.77.1:51820"), Some(25))),
                (key(2), peer_config(&["10.42.0.2/32", "fd42::2/128"], Some("[fd00::2]:51820"), None)),
                (key(3), PeerConfig { allowed_ips: many, ..peer_config(&[], None, None) }),
            ]
            .into(),
        };
        // And enough peers that the kernel's dump of the device takes several messages (the
        // kernel fills messages up to the reader's buffer size, 32 KiB at most).
        for n in 10..250u8 {
            let ips: Vec<String> = (0..8).map(|i| format!("10.{n}.{i}.0/24")).collect();
            let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
            desired.peers.insert(key(n), peer_config(&ips, Some(&format!("192.168.77.{n}:51820")), None));
        }
        device.apply(&plan(&fresh, &desired)).await.unwrap();
        let state = device.get().await.unwrap();
        assert!(plan(&state, &desired).is_empty(), "{:?}", plan(&state, &desired));
        assert_eq!(state.peers[&key(3)].config.allowed_ips.len(), 300);
        // Exactly what was asked for: every peer, its allowed IPs, endpoint and keepalive.
        assert_eq!(state.private_key.as_ref(), Some(&desired.private_key));
        assert_eq!(state.listen_port, Some(desired.listen_port));
        let read: BTreeMap<Key, PeerConfig> = state.peers.iter().map(|(k, p)| (*k, p.config.clone())).collect();
        assert_eq!(read, desired.peers, "the device does not read back as it was set");
        let (parts, _) = Genl::connect(IFACE).unwrap().dump().await.unwrap();
        let split = parts.len();
        assert!(split > 2, "the dump took only {split} message(s): nothing was split");

        // Adopted on a second open; a change touches only what changed.
        let device = KernelDevice::open(IFACE).await.unwrap();
        desired.peers.remove(&key(1));
        desired.peers.get_mut(&key(2)).unwrap().allowed_ips.insert("10.42.7.7/32".parse().unwrap());
        desired.peers.get_mut(&key(3)).unwrap().allowed_ips = nets(&["10.42.0.3/32"]);
        let change = plan(&state, &desired);
        assert_eq!(change.peers_touched(), 3);
        device.apply(&change).await.unwrap();
        assert!(plan(&device.get().await.unwrap(), &desired).is_empty());
        format!("kernel ({} peers read back exactly, from a dump of {split} messages)", state.peers.len())
    }
}
