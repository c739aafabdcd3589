//! Fuzz targets (proptest) for what mesh-wireguard parses from a device and from the API: UAPI
//! `get` and `set` answers (from wireguard-go's socket) and keys (hex from the socket, base64
//! from MeshNode status). Inputs are arbitrary text, arbitrary bytes, UAPI-shaped lines, and a
//! real wireguard-go answer with random damage. The parsers must never panic; an answer that
//! parses prints back (as wireguard-go would print that device) to text that parses to the same
//! device; an accepted key prints back to the text it came from.
//!
//! `make test` runs them with proptest's default 256 cases each; `PROPTEST_CASES=100000 make
//! fuzz` runs them for longer.

use mesh_wireguard::uapi::{parse_get, parse_set_answer, render_get};
use mesh_wireguard::{Key, PrivateKey};
use proptest::prelude::*;

const PEER_HEX: &str = "58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376";
const PRIVATE_HEX: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";

/// A get answer as wireguard-go prints it: two peers, every key it sends.
fn real_answer() -> String {
    format!(
        "private_key={PRIVATE_HEX}\nlisten_port=51820\npublic_key={PEER_HEX}\npreshared_key={zero}\nprotocol_version=1\n\
         endpoint=192.168.77.2:51820\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500\ntx_bytes=1000\n\
         rx_bytes=2000\npersistent_keepalive_interval=0\nallowed_ip=10.42.0.2/32\nallowed_ip=10.42.7.7/32\n\
         public_key={other}\nendpoint=[fd00::2]:51820\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n\
         persistent_keepalive_interval=25\nallowed_ip=10.42.0.3/32\nerrno=0\n\n",
        zero = "0".repeat(64),
        other = "ab".repeat(32),
    )
}

/// Parses `text`; if it is a device, checks that it round-trips.
fn check_get(text: &str) -> Result<(), TestCaseError> {
    let _ = parse_set_answer(text);
    if let Ok(device) = parse_get(text) {
        let printed = render_get(&device);
        prop_assert_eq!(parse_get(&printed), Ok(device), "{:?} printed as {:?}", text, printed);
    }
    Ok(())
}

/// UAPI-shaped lines: real keys (and some others) with values of the right and the wrong kind.
fn uapi_lines() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "private_key",
        "listen_port",
        "public_key",
        "endpoint",
        "allowed_ip",
        "persistent_keepalive_interval",
        "last_handshake_time_sec",
        "last_handshake_time_nsec",
        "rx_bytes",
        "tx_bytes",
        "errno",
        "protocol_version",
        "fwmark",
    ]);
    let value = prop_oneof![
        "[0-9a-fA-F]{64}",
        "[0-9]{1,25}",
        "-?[0-9]{1,5}",
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(/[0-9]{1,2})?(:[0-9]{1,6})?",
        "\\[[0-9a-f:]{2,30}(%[a-z0-9]{1,4})?\\]:[0-9]{1,5}",
        "[0-9a-f:]{2,30}/[0-9]{1,3}",
        any::<String>(),
    ];
    proptest::collection::vec((key, value, prop::bool::weighted(0.97)), 0..24).prop_map(|lines| {
        lines.into_iter().map(|(k, v, eq)| if eq { format!("{k}={v}\n") } else { format!("{k}{v}\n") }).collect()
    })
}

/// The real answer with random damage: lines dropped, repeated, swapped, values replaced, cut.
fn damaged_answer() -> impl Strategy<Value = String> {
    let edits = proptest::collection::vec(
        (0u8..5, any::<prop::sample::Index>(), any::<prop::sample::Index>(), ".{0,12}"),
        1..6,
    );
    (edits, any::<prop::sample::Index>(), any::<bool>()).prop_map(|(edits, cut, truncate)| {
        let mut lines: Vec<String> = real_answer().lines().map(str::to_owned).collect();
        for (kind, a, b, text) in edits {
            if lines.is_empty() {
                break;
            }
            let (i, j) = (a.index(lines.len()), b.index(lines.len()));
            match kind {
                0 => {
                    lines.remove(i);
                }
                1 => lines.insert(j, lines[i].clone()),
                2 => lines.swap(i, j),
                3 => {
                    let key = lines[i].split('=').next().unwrap_or_default().to_owned();
                    lines[i] = format!("{key}={text}");
                }
                _ => lines[i].push_str(&text),
            }
        }
        let mut out = lines.join("\n") + "\n";
        if truncate {
            let at = cut.index(out.len() + 1);
            let at = (0..=at).rev().find(|i| out.is_char_boundary(*i)).unwrap_or(0);
            out.truncate(at);
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn fuzz_uapi_arbitrary_text(text in any::<String>()) {
        check_get(&text)?;
    }

    #[test]
    fn fuzz_uapi_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        check_get(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn fuzz_uapi_shaped_lines(text in uapi_lines()) {
        check_get(&text)?;
    }

    #[test]
    fn fuzz_uapi_damaged_real_answer(text in damaged_answer()) {
        check_get(&text)?;
    }

    /// An accepted key prints back to its text: hex in lowercase, base64 as given (trimmed).
    #[test]
    fn fuzz_keys(
        hex in prop_oneof![
            "[0-9a-fA-F]{64}",
            // 32 byte-sized pieces, some of them signed: what an integer parser might let through.
            proptest::collection::vec(prop_oneof!["[0-9a-fA-F]{2}", "\\+[0-9a-fA-F]"], 32).prop_map(|p| p.concat()),
            any::<String>(),
        ],
        b64 in prop_oneof!["[A-Za-z0-9+/]{43}=", "[A-Za-z0-9+/= ]{40,46}", any::<String>()],
    ) {
        if let Ok(key) = Key::from_hex(&hex) {
            prop_assert_eq!(key.to_hex(), hex.to_ascii_lowercase());
        }
        let _ = PrivateKey::from_hex(&hex);
        if let Ok(key) = Key::from_base64(&b64) {
            prop_assert_eq!(key.to_base64(), b64.trim());
        }
        let _ = PrivateKey::from_base64(&b64);
    }
}

#[test]
fn the_real_answer_parses() {
    let device = parse_get(&real_answer()).expect("a real wireguard-go answer");
    assert_eq!(device.peers.len(), 2);
    assert_eq!(parse_get(&render_get(&device)), Ok(device));
}

/// Found by `fuzz_keys`: Rust's integer parser accepts a leading '+', so `+f` passed as the hex
/// byte 0x0f and a 64-character text that is not hex was taken for a key.
#[test]
fn a_hex_key_with_signs_is_refused() {
    assert!(Key::from_hex(&"+f".repeat(32)).is_err());
    assert!(Key::from_hex(&"0f".repeat(32)).is_ok());
    let answer = format!("listen_port=1\npublic_key={}\nerrno=0\n", "+f".repeat(32));
    assert!(parse_get(&answer).is_err());
}
