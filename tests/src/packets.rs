//! Frames for the packet fixtures and benchmarks, built with etherparse.

use etherparse::{
    EtherType, Ethernet2Header, IpAuthHeader, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options,
    Ipv6Header, Ipv6RawExtHeader, SingleVlanHeader, TcpHeader, UdpHeader, VlanId,
};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;
pub const ECE: u8 = 0x40;
pub const CWR: u8 = 0x80;

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
pub const ETH_ARP: u16 = 0x0806;
pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;

/// The server's addresses in the fixtures (documentation/benchmark ranges).
pub const SERVER_V4: [u8; 4] = [198, 19, 0, 1];
pub const SERVER_V6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// A TCP header with `flags` (FIN..CWR bits as on the wire).
pub fn tcp_header(sport: u16, dport: u16, flags: u8) -> TcpHeader {
    let mut t = TcpHeader::new(sport, dport, 0x1000_0000, 64_240);
    t.fin = flags & FIN != 0;
    t.syn = flags & SYN != 0;
    t.rst = flags & RST != 0;
    t.psh = flags & PSH != 0;
    t.ack = flags & ACK != 0;
    t.urg = flags & URG != 0;
    t.ece = flags & ECE != 0;
    t.cwr = flags & CWR != 0;
    if t.ack {
        t.acknowledgment_number = 0x2000_0000;
    }
    t
}

/// An IPv4 header for `payload_len` bytes of `proto`, with `options` (a multiple of 4
/// bytes, at most 40) and fragment fields.
pub fn ipv4_header(
    src: [u8; 4],
    proto: u8,
    payload_len: usize,
    options: &[u8],
    frag_offset: u16,
    more_fragments: bool,
) -> Ipv4Header {
    let mut h = Ipv4Header::new(payload_len as u16, 64, IpNumber(proto), src, SERVER_V4)
        .unwrap_or_default();
    h.options = Ipv4Options::try_from(options).unwrap_or_default();
    h.total_len = (h.header_len() + payload_len) as u16;
    h.fragment_offset = IpFragOffset::try_new(frag_offset).unwrap_or(IpFragOffset::ZERO);
    h.more_fragments = more_fragments;
    h.header_checksum = h.calc_header_checksum();
    h
}

/// IPv4 TCP segment (IP header and TCP header, no payload).
pub fn ipv4_tcp(src: [u8; 4], dport: u16, flags: u8, options: &[u8]) -> Vec<u8> {
    let mut t = tcp_header(40_000, dport, flags);
    let ip = ipv4_header(src, 6, t.header_len(), options, 0, false);
    t.checksum = t.calc_checksum_ipv4(&ip, &[]).unwrap_or(0);
    let mut v = ip.to_bytes().to_vec();
    v.extend_from_slice(&t.to_bytes());
    v
}

/// An IPv6 extension header to put in front of the upper layer.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
    /// Fragment header with offset (8-byte units) and more-fragments flag.
    Fragment(u16, bool),
    Auth,
}

/// An IPv6 packet: header, `exts` in order, then `upper` (protocol `upper_proto`).
pub fn ipv6(src: [u8; 16], exts: &[Ext], upper_proto: u8, upper: &[u8]) -> Vec<u8> {
    let mut chain: Vec<Vec<u8>> = Vec::new();
    let protos: Vec<u8> = exts
        .iter()
        .map(|e| match e {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::DestOpts => 60,
            Ext::Fragment(..) => 44,
            Ext::Auth => 51,
        })
        .collect();
    for (i, e) in exts.iter().enumerate() {
        let next = IpNumber(protos.get(i + 1).copied().unwrap_or(upper_proto));
        let bytes = match e {
            // 14 bytes of options (PadN) make a 16-byte header: the length field is
            // then non-zero, which the walker must honour.
            Ext::HopByHop | Ext::DestOpts | Ext::Routing => {
                let mut payload = [0u8; 14];
                if let Ext::Routing = e {
                    payload[0] = 4; // segment routing type, not followed
                } else {
                    payload[0] = 1; // PadN
                    payload[1] = 12;
                }
                Ipv6RawExtHeader::new_raw(next, &payload)
                    .map(|h| h.to_bytes().to_vec())
                    .unwrap_or_default()
            }
            // Written by hand per RFC 8200 §4.5 (offset << 3 | M): etherparse 0.16's
            // `Ipv6FragmentHeader::to_bytes` puts the M flag in the wrong bit.
            Ext::Fragment(off, more) => {
                let [o0, o1] = ((off & 0x1fff) << 3 | u16::from(*more)).to_be_bytes();
                vec![next.0, 0, o0, o1, 0, 0, 0x12, 0x34]
            }
            Ext::Auth => IpAuthHeader::new(next, 7, 1, &[0u8; 12])
                .map(|h| h.to_bytes().to_vec())
                .unwrap_or_default(),
        };
        chain.push(bytes);
    }
    let ext_len: usize = chain.iter().map(Vec::len).sum();
    let h = Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: (ext_len + upper.len()) as u16,
        next_header: IpNumber(protos.first().copied().unwrap_or(upper_proto)),
        hop_limit: 64,
        source: src,
        destination: SERVER_V6,
    };
    let mut v = h.to_bytes().to_vec();
    for c in chain {
        v.extend_from_slice(&c);
    }
    v.extend_from_slice(upper);
    v
}

/// IPv6 TCP segment with `exts` in front of the TCP header.
pub fn ipv6_tcp(src: [u8; 16], dport: u16, flags: u8, exts: &[Ext]) -> Vec<u8> {
    let mut t = tcp_header(40_000, dport, flags);
    let plain = Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: t.header_len() as u16,
        next_header: IpNumber(6),
        hop_limit: 64,
        source: src,
        destination: SERVER_V6,
    };
    t.checksum = t.calc_checksum_ipv6(&plain, &[]).unwrap_or(0);
    ipv6(src, exts, 6, &t.to_bytes())
}

/// An Ethernet frame with VLAN tags (`tags` are TPIDs, outermost first).
pub fn ether(tags: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let first = tags.first().copied().unwrap_or(ethertype);
    let mut v = Ethernet2Header {
        source: [0x02, 0, 0, 0, 0, 0x02],
        destination: [0x02, 0, 0, 0, 0, 0x01],
        ether_type: EtherType(first),
    }
    .to_bytes()
    .to_vec();
    for (i, _) in tags.iter().enumerate() {
        let inner = tags.get(i + 1).copied().unwrap_or(ethertype);
        let tag = SingleVlanHeader {
            pcp: Default::default(),
            drop_eligible_indicator: false,
            vlan_id: VlanId::try_new(100 + i as u16).unwrap_or_default(),
            ether_type: EtherType(inner),
        };
        v.extend_from_slice(&tag.to_bytes());
    }
    v.extend_from_slice(payload);
    v
}

/// A UDP datagram over IPv4.
pub fn ipv4_udp(src: [u8; 4]) -> Vec<u8> {
    let u = UdpHeader {
        source_port: 5353,
        destination_port: 53,
        length: 8,
        checksum: 0,
    };
    let mut v = ipv4_header(src, 17, 8, &[], 0, false).to_bytes().to_vec();
    v.extend_from_slice(&u.to_bytes());
    v
}

/// An ICMP echo request over IPv4.
pub fn ipv4_icmp(src: [u8; 4]) -> Vec<u8> {
    let body = [8u8, 0, 0xf7, 0xff, 0, 0, 0, 0];
    let mut v = ipv4_header(src, 1, body.len(), &[], 0, false)
        .to_bytes()
        .to_vec();
    v.extend_from_slice(&body);
    v
}

/// An ARP request.
pub fn arp() -> Vec<u8> {
    let mut body = vec![0, 1, 8, 0, 6, 4, 0, 1];
    body.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 198, 18, 0, 2]);
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 198, 19, 0, 1]);
    ether(&[], ETH_ARP, &body)
}

/// A SYN from `src` to the server's port `dport`, as a whole frame.
pub fn syn_v4(src: [u8; 4], dport: u16) -> Vec<u8> {
    ether(&[], ETH_IPV4, &ipv4_tcp(src, dport, SYN, &[]))
}

pub fn syn_v6(src: [u8; 16], dport: u16) -> Vec<u8> {
    ether(&[], ETH_IPV6, &ipv6_tcp(src, dport, SYN, &[]))
}

/// A SYN from `src:sport` with sequence number `isn` to the server's `dport`: one
/// client's attempt (its retransmissions repeat all of it).
pub fn syn_v4_isn(src: [u8; 4], sport: u16, dport: u16, isn: u32) -> Vec<u8> {
    let mut t = tcp_header(sport, dport, SYN);
    t.sequence_number = isn;
    let ip = ipv4_header(src, 6, t.header_len(), &[], 0, false);
    t.checksum = t.calc_checksum_ipv4(&ip, &[]).unwrap_or(0);
    let mut v = ip.to_bytes().to_vec();
    v.extend_from_slice(&t.to_bytes());
    ether(&[], ETH_IPV4, &v)
}
