//! The guest network layout every sandbox shares (E2B's layout): the same guest address,
//! gateway and MACs in every sandbox's network namespace, so a restored or forked guest needs
//! no reconfiguration. What differs per sandbox lives on the host side of its namespace.

use std::net::Ipv4Addr;

/// The guest's `eth0` address.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);
/// The host end of the guest's link (the tap in the sandbox's namespace): the guest's default
/// gateway and DNS resolver.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
/// Prefix length of the guest link (a /30: the gateway and the guest).
pub const PREFIX_LEN: u8 = 30;
/// The guest's MAC address (locally administered, unicast).
pub const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x1f, 0x00, 0x02];
/// The tap's MAC address, so the guest's neighbour entry for its gateway stays valid in
/// every namespace it is restored into.
pub const TAP_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x1f, 0x00, 0x01];
/// The interface name of the tap in a sandbox's namespace.
pub const TAP_NAME: &str = "fsl-tap0";

/// The port of the DNS forwarder on [`GATEWAY_ADDR`] (the guest's resolver, served from the
/// host side of the sandbox's namespace so that names follow the egress policy).
pub const DNS_PORT: u16 = 53;
/// The port on [`GATEWAY_ADDR`] where connections to [`PROXIED_PORTS`] are redirected while
/// a sandbox's policy names domains (the host-side proxy that checks Host and SNI).
pub const PROXY_PORT: u16 = 15001;
/// The guest's destination ports that go through the proxy while its policy names domains
/// (HTTP and TLS: the protocols that carry the name they are for).
pub const PROXIED_PORTS: [u16; 2] = [80, 443];

/// The netmask of [`PREFIX_LEN`].
pub fn netmask() -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX << (32 - u32::from(PREFIX_LEN)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_and_its_gateway_share_the_link() {
        let mask = u32::from(netmask());
        assert_eq!(netmask(), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(u32::from(GUEST_ADDR) & mask, u32::from(GATEWAY_ADDR) & mask);
        assert_ne!(GUEST_ADDR, GATEWAY_ADDR);
        assert_eq!(GUEST_MAC[0] & 1, 0, "unicast");
    }
}
