//! The agent's managed block in `/etc/hosts` (`mesh-agent --resolver hosts`), without I/O:
//! render the block from the DNS zone's records, splice it into a file's text, take it out again.
//!
//! The block is every line from [`BEGIN`] to the first [`END`] after it. Everything outside it
//! is kept byte for byte (line endings, comments, blank lines, odd spacing), in its place; the
//! one change ever made outside is a final newline added to a last line that had none, before a
//! block appended after it. A [`BEGIN`] with no [`END`] (a write cut short) runs to the end of
//! the file, so a repair never leaves half a block behind. Several blocks (edited by hand) are
//! merged into one, at the place of the first.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// The first line of the block.
pub const BEGIN: &str = "# BEGIN harness-mesh (managed by mesh-agent; do not edit)";
/// The last line of the block.
pub const END: &str = "# END harness-mesh";

/// The block for `records` (name → addresses, as `dns::Zone::records`), one `ADDRESS NAME` line
/// per address, sorted by name; empty (no block at all) when there are no records. Names that
/// are not plain DNS names (letters, digits, `-`, `.`, `_`) are left out: a hosts line must never
/// carry anything else.
pub fn render(records: &BTreeMap<String, Vec<Ipv4Addr>>) -> String {
    // One buffer for the whole block: 55,000 names at 5,000 nodes, rendered whenever one changes.
    let lines: usize = records.iter().map(|(name, addrs)| addrs.len() * (name.len() + 17)).sum();
    let mut block = String::with_capacity(BEGIN.len() + lines + END.len() + 2);
    block.push_str(BEGIN);
    block.push('\n');
    let empty = block.len();
    for (name, addrs) in records {
        if !plain_name(name) {
            continue;
        }
        for addr in addrs {
            push_address(&mut block, *addr);
            block.push('\t');
            block.push_str(name);
            block.push('\n');
        }
    }
    if block.len() == empty {
        return String::new();
    }
    block.push_str(END);
    block.push('\n');
    block
}

/// Appends `addr` in dotted decimal, as its `Display` does, without the formatting machinery
/// (a third of the block's cost at 55,000 lines).
fn push_address(out: &mut String, addr: Ipv4Addr) {
    for (i, octet) in addr.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.trim_end() == marker
}

/// `text` with its managed block(s) replaced by `block` (as [`render`] makes it; empty: no
/// block). Without a block in `text`, `block` is appended at the end.
pub fn splice(text: &str, block: &str) -> String {
    let mut out = String::with_capacity(text.len() + block.len());
    let mut placed = false;
    let mut inside = false;
    for line in text.split_inclusive('\n') {
        if inside {
            if is_marker(line, END) {
                inside = false;
            }
            continue;
        }
        if is_marker(line, BEGIN) {
            inside = true;
            if !placed {
                out.push_str(block);
                placed = true;
            }
            continue;
        }
        out.push_str(line);
    }
    if !placed && !block.is_empty() {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(block);
    }
    out
}

/// `text` without the managed block.
pub fn remove(text: &str) -> String {
    splice(text, "")
}

/// Whether `text` has a managed block.
pub fn has_block(text: &str) -> bool {
    text.split_inclusive('\n').any(|line| is_marker(line, BEGIN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn records(pairs: &[(&str, &[[u8; 4]])]) -> BTreeMap<String, Vec<Ipv4Addr>> {
        pairs.iter().map(|(n, a)| ((*n).to_owned(), a.iter().map(|o| Ipv4Addr::from(*o)).collect())).collect()
    }

    proptest! {
        #[test]
        fn an_address_is_written_as_its_display_writes_it(octets in any::<[u8; 4]>()) {
            let addr = Ipv4Addr::from(octets);
            let mut out = String::from("x");
            push_address(&mut out, addr);
            prop_assert_eq!(out, format!("x{addr}"));
        }
    }

    #[test]
    fn the_block_lists_one_line_per_address_between_the_markers() {
        let block = render(&records(&[
            ("web.default.mesh.local", &[[10, 42, 1, 5]]),
            ("db.mesh.local", &[[10, 42, 1, 7], [10, 42, 1, 8]]),
        ]));
        assert_eq!(
            block,
            format!(
                "{BEGIN}\n10.42.1.7\tdb.mesh.local\n10.42.1.8\tdb.mesh.local\n10.42.1.5\tweb.default.mesh.local\n{END}\n"
            )
        );
        assert_eq!(render(&BTreeMap::new()), "", "no records, no block");
        assert_eq!(render(&records(&[("evil name\n1.2.3.4 x", &[[10, 42, 0, 1]])])), "", "never a foreign line");
    }

    #[test]
    fn splicing_keeps_the_other_lines_and_replaces_the_block_in_place() {
        let block = render(&records(&[("a.mesh.local", &[[10, 42, 0, 2]])]));
        let original = "127.0.0.1 localhost\r\n# mine\n\n::1 ip6-localhost";
        let spliced = splice(original, &block);
        assert_eq!(spliced, format!("{original}\n{block}"), "appended, the last line ended first");
        let other = render(&records(&[("b.mesh.local", &[[10, 42, 0, 3]])]));
        let edited = format!("{BEGIN}\n1.2.3.4 stale\n{END}\n10.0.0.1 after\n");
        assert_eq!(splice(&edited, &other), format!("{other}10.0.0.1 after\n"), "replaced where it was");
        assert_eq!(remove(&spliced), format!("{original}\n"));
        assert!(has_block(&spliced) && !has_block(original));
    }

    #[test]
    fn a_block_cut_short_or_repeated_is_repaired() {
        let block = render(&records(&[("a.mesh.local", &[[10, 42, 0, 2]])]));
        let cut = format!("keep\n{BEGIN}\n10.42.0.2\ta.me");
        assert_eq!(splice(&cut, &block), format!("keep\n{block}"));
        let twice = format!("x\n{BEGIN}\n{END}\ny\n{BEGIN}\n1.1.1.1 z\n{END}\nw\n");
        assert_eq!(splice(&twice, &block), format!("x\n{block}y\nw\n"));
        assert_eq!(remove(&twice), "x\ny\nw\n");
    }

    fn outside_line() -> impl Strategy<Value = String> {
        // Anything a hand-edited hosts file holds, markers excepted (those are the block's).
        ("[ -~\t]{0,40}", prop_oneof![Just("\n"), Just("\r\n")])
            .prop_filter("not a marker", |(l, _)| !is_marker(l, BEGIN) && !is_marker(l, END))
            .prop_map(|(l, end)| format!("{l}{end}"))
    }

    fn zone() -> impl Strategy<Value = BTreeMap<String, Vec<Ipv4Addr>>> {
        proptest::collection::btree_map(
            "[a-z][a-z0-9-]{0,10}\\.(default\\.)?mesh\\.local",
            proptest::collection::vec(any::<[u8; 4]>().prop_map(Ipv4Addr::from), 1..3),
            0..5,
        )
    }

    proptest! {
        #[test]
        fn lines_outside_the_block_are_kept_byte_for_byte_and_splicing_is_idempotent(
            before in proptest::collection::vec(outside_line(), 0..8),
            after in proptest::collection::vec(outside_line(), 0..8),
            old in zone(),
            new in zone(),
        ) {
            let (before, after) = (before.concat(), after.concat());
            let text = format!("{before}{}{after}", render(&old));
            let spliced = splice(&text, &render(&new));
            let expected = if render(&old).is_empty() && render(&new).is_empty() {
                text.clone()
            } else if render(&old).is_empty() {
                format!("{before}{after}{}", render(&new))
            } else {
                format!("{before}{}{after}", render(&new))
            };
            prop_assert_eq!(&spliced, &expected);
            prop_assert_eq!(splice(&spliced, &render(&new)), spliced.clone(), "idempotent");
            prop_assert_eq!(remove(&spliced), format!("{before}{after}"), "removal gives the other lines back");
            prop_assert_eq!(remove(&remove(&spliced)), remove(&spliced));
        }
    }
}
