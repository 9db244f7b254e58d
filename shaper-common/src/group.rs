//! Group key derivation: a source address masked to the rule's group length.

/// `addr` keeping its first `len` bits (`len` ≥ 32 keeps all of it).
#[inline(always)]
pub fn group_v4(addr: [u8; 4], len: u8) -> [u8; 4] {
    let a = u32::from_be_bytes(addr);
    (a & mask32(len)).to_be_bytes()
}

/// `addr` keeping its first `len` bits (`len` ≥ 128 keeps all of it).
///
/// Works on two `u64` halves: 128-bit arithmetic has no BPF lowering.
#[inline(always)]
pub fn group_v6(addr: [u8; 16], len: u8) -> [u8; 16] {
    let [
        a0,
        a1,
        a2,
        a3,
        a4,
        a5,
        a6,
        a7,
        b0,
        b1,
        b2,
        b3,
        b4,
        b5,
        b6,
        b7,
    ] = addr;
    let hi = u64::from_be_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
    let lo = u64::from_be_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
    let (mhi, mlo) = if len >= 64 {
        (u64::MAX, mask64(len - 64))
    } else {
        (mask64(len), 0)
    };
    let [h0, h1, h2, h3, h4, h5, h6, h7] = (hi & mhi).to_be_bytes();
    let [l0, l1, l2, l3, l4, l5, l6, l7] = (lo & mlo).to_be_bytes();
    [
        h0, h1, h2, h3, h4, h5, h6, h7, l0, l1, l2, l3, l4, l5, l6, l7,
    ]
}

#[inline(always)]
fn mask32(len: u8) -> u32 {
    if len >= 32 {
        u32::MAX
    } else {
        // len < 32 here, so the shift is in range; checked_shl keeps it panic-free anyway.
        !(u32::MAX.checked_shr(u32::from(len)).unwrap_or(0))
    }
}

#[inline(always)]
fn mask64(len: u8) -> u64 {
    if len >= 64 {
        u64::MAX
    } else {
        !(u64::MAX.checked_shr(u32::from(len)).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v6(s: &str) -> [u8; 16] {
        s.parse::<Ipv6Addr>()
            .map(|a| a.octets())
            .unwrap_or([0xff; 16])
    }

    #[test]
    fn v4_lengths() {
        let a = Ipv4Addr::new(198, 51, 100, 77).octets();
        assert_eq!(group_v4(a, 24), [198, 51, 100, 0]);
        assert_eq!(group_v4(a, 32), a);
        assert_eq!(group_v4(a, 0), [0, 0, 0, 0]);
        assert_eq!(group_v4(a, 20), [198, 51, 96, 0]);
        assert_eq!(group_v4(a, 200), a);
    }

    #[test]
    fn v6_lengths() {
        let a = v6("2001:db8:1234:5678:9abc:def0:1122:3344");
        assert_eq!(group_v6(a, 48), v6("2001:db8:1234::"));
        assert_eq!(group_v6(a, 56), v6("2001:db8:1234:5600::"));
        assert_eq!(group_v6(a, 64), v6("2001:db8:1234:5678::"));
        assert_eq!(group_v6(a, 128), a);
        assert_eq!(group_v6(a, 0), [0; 16]);
        assert_eq!(group_v6(a, 65), v6("2001:db8:1234:5678:8000::"));
    }

    proptest! {
        #[test]
        fn v6_matches_u128_reference(addr in any::<u128>(), len in 0u8..=128) {
            let want = if len == 0 { 0 } else { addr & (u128::MAX << (128 - u32::from(len))) };
            prop_assert_eq!(group_v6(addr.to_be_bytes(), len), want.to_be_bytes());
        }

        #[test]
        fn v4_matches_reference(addr in any::<u32>(), len in 0u8..=32) {
            let want = if len == 0 { 0 } else { addr & (u32::MAX << (32 - u32::from(len))) };
            prop_assert_eq!(group_v4(addr.to_be_bytes(), len), want.to_be_bytes());
        }

        #[test]
        fn same_group_iff_same_prefix(a in any::<u128>(), b in any::<u128>(), len in 0u8..=128) {
            let same = len == 0 || (a ^ b) >> (128 - u32::from(len)) == 0;
            prop_assert_eq!(group_v6(a.to_be_bytes(), len) == group_v6(b.to_be_bytes(), len), same);
        }
    }
}
