//! What the kernel says of XDP on an interface, over rtnetlink: the mode and the
//! program of its attachment (`RTM_GETLINK`), and switching off a program another tool
//! attached without a link (`RTM_SETLINK`). Structured attributes, no iproute2 and no
//! text to parse.

use anyhow::{Context as _, Result, anyhow, bail};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::{attach::Attached, bpfsys};

/// The XDP program on an interface, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpState {
    /// Native or generic; `None` for other attachments (offloaded, several at once).
    pub mode: Option<Attached>,
    /// The program's id (0 if the kernel gives none).
    pub prog_id: u32,
}

/// Send one request and return the first reply.
fn request(
    message: RouteNetlinkMessage,
    flags: u16,
) -> Result<NetlinkPayload<RouteNetlinkMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    socket.bind_auto().context("binding a netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting a netlink socket")?;
    let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
    packet.header.flags = NLM_F_REQUEST | flags;
    packet.header.sequence_number = 1;
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0).context("sending a netlink request")?;
    // One link's attributes (statistics included) fit in a few KiB.
    let mut rx = vec![0u8; 1 << 16];
    let n = socket
        .recv(&mut &mut rx[..], 0)
        .context("reading a netlink reply")?;
    let reply: NetlinkMessage<RouteNetlinkMessage> =
        NetlinkMessage::deserialize(rx.get(..n).unwrap_or_default())
            .map_err(|e| anyhow!("a netlink reply that does not parse: {e}"))?;
    Ok(reply.payload)
}

/// The XDP program on interface `ifindex`, if any.
pub fn xdp(ifindex: u32) -> Result<Option<XdpState>> {
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    match request(RouteNetlinkMessage::GetLink(msg), 0)? {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
            Ok(xdp_of(&link.attributes))
        }
        NetlinkPayload::Error(e) => {
            Err(e.to_io()).with_context(|| format!("asking the kernel about interface {ifindex}"))
        }
        other => bail!("an unexpected netlink reply: {other:?}"),
    }
}

/// The XDP attachment in a link's attributes.
fn xdp_of(attributes: &[LinkAttribute]) -> Option<XdpState> {
    let xdp = attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(x) => Some(x),
        _ => None,
    })?;
    let mut state = XdpState {
        mode: None,
        prog_id: 0,
    };
    for x in xdp {
        match x {
            LinkXdp::Attached(XdpAttached::None) => return None,
            LinkXdp::Attached(XdpAttached::Driver) => state.mode = Some(Attached::Native),
            LinkXdp::Attached(XdpAttached::SocketBuffer) => state.mode = Some(Attached::Skb),
            LinkXdp::ProgId(id) => state.prog_id = *id,
            _ => {}
        }
    }
    Some(state)
}

/// Switch off the XDP program attached to `ifindex` without a link (by another tool,
/// through netlink), in whichever mode it is.
pub fn detach(ifindex: u32) {
    for flags in [0, bpfsys::XDP_FLAGS_SKB_MODE, bpfsys::XDP_FLAGS_DRV_MODE] {
        let mut msg = LinkMessage::default();
        msg.header.index = ifindex;
        msg.attributes.push(LinkAttribute::Xdp(vec![
            LinkXdp::Fd(-1),
            LinkXdp::Flags(flags),
        ]));
        // A mode without a program answers with an error: nothing to switch off there.
        let _ = request(RouteNetlinkMessage::SetLink(msg), NLM_F_ACK);
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::link::{LinkAttribute, LinkXdp, XdpAttached};

    use super::{XdpState, xdp_of};
    use crate::attach::Attached;

    #[test]
    fn the_mode_and_program_come_from_the_attributes_not_the_name() {
        let attrs = |x: Vec<LinkXdp>| {
            vec![
                LinkAttribute::IfName("xdp0".to_string()),
                LinkAttribute::Xdp(x),
            ]
        };
        assert_eq!(
            xdp_of(&attrs(vec![LinkXdp::Attached(XdpAttached::None)])),
            None,
            "an interface named xdp0 without a program"
        );
        assert_eq!(
            xdp_of(&attrs(vec![
                LinkXdp::Attached(XdpAttached::SocketBuffer),
                LinkXdp::ProgId(42)
            ])),
            Some(XdpState {
                mode: Some(Attached::Skb),
                prog_id: 42
            })
        );
        assert_eq!(
            xdp_of(&attrs(vec![
                LinkXdp::Attached(XdpAttached::Driver),
                LinkXdp::ProgId(7)
            ])),
            Some(XdpState {
                mode: Some(Attached::Native),
                prog_id: 7
            })
        );
        assert_eq!(xdp_of(&[LinkAttribute::IfName("eth0".into())]), None);
    }
}
