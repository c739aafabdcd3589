//! Fuzz targets (proptest) for what mesh-core parses from the API: endpoints (`host:port`),
//! mesh IPs and subnets. Each takes arbitrary text, arbitrary bytes and near-valid text; the
//! parser must never panic, and whatever it accepts must print back to text it accepts again
//! as the same value.
//!
//! `make test` runs them with proptest's default 256 cases each; `PROPTEST_CASES=100000 make
//! fuzz` runs them (and the other crates' `fuzz_*` tests) for longer.

use mesh_core::{Endpoint, EndpointHost, Subnet, parse_mesh_ip};
use proptest::prelude::*;

/// Text that looks like an endpoint: the characters of every endpoint form, in any order.
fn endpointish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9.:]{0,24}",
        "\\[[0-9a-fA-F:.%]{0,40}\\]:[0-9]{0,6}",
        "[a-zA-Z0-9.-]{0,70}:[0-9+-]{0,7}",
        "[0-9a-z.:\\[\\]%+ -]{0,80}",
        // A valid endpoint with one character replaced by any character.
        ("[a-z0-9]{1,10}\\.[a-z]{2,5}:[1-9][0-9]{0,4}", any::<prop::sample::Index>(), any::<char>()).prop_map(
            |(text, at, c)| {
                let mut chars: Vec<char> = text.chars().collect();
                let i = at.index(chars.len());
                chars[i] = c;
                chars.into_iter().collect()
            }
        ),
    ]
}

/// Accepted endpoints are well formed and round-trip through `Display`.
fn check_endpoint(text: &str) -> Result<(), TestCaseError> {
    if let Ok(endpoint) = Endpoint::parse(text) {
        prop_assert!(endpoint.port > 0);
        if let EndpointHost::Name(name) = &endpoint.host {
            prop_assert!(!name.is_empty() && name.len() <= 253, "{name:?}");
            prop_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'), "{name:?}");
        }
        let printed = endpoint.to_string();
        prop_assert_eq!(Endpoint::parse(&printed), Ok(endpoint), "{:?} printed as {:?}", text, printed);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn fuzz_endpoint_arbitrary_text(text in any::<String>()) {
        check_endpoint(&text)?;
    }

    #[test]
    fn fuzz_endpoint_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_endpoint(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn fuzz_endpoint_near_valid(text in endpointish()) {
        check_endpoint(&text)?;
    }

    /// An accepted mesh IP is exactly the plain dotted quad the API stores.
    #[test]
    fn fuzz_mesh_ip(text in prop_oneof![any::<String>(), "[0-9./ :a-f]{0,20}"]) {
        if let Ok(ip) = parse_mesh_ip(&text) {
            prop_assert_eq!(ip.to_string(), text);
        }
    }

    /// An accepted subnet prints canonically and parses back to itself; its bounds hold.
    #[test]
    fn fuzz_subnet(text in prop_oneof![any::<String>(), "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}/[0-9+-]{0,3}"]) {
        if let Ok(subnet) = Subnet::parse(&text) {
            prop_assert_eq!(Subnet::parse(&subnet.to_string()), Ok(subnet));
            prop_assert!(subnet.contains(subnet.network()) && subnet.contains(subnet.broadcast()));
            prop_assert!(u32::from(subnet.network()) <= u32::from(subnet.broadcast()));
        }
    }
}
