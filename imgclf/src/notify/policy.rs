//! Which addresses a callback may reach. Loopback, private, link-local (cloud metadata lives
//! there), shared, multicast, reserved and IPv6 transition ranges are refused unless an
//! allowlist names them, and a public address takes ports 80 and 443 only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// An IP network, `10.0.0.0/8` or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("bad prefix in {s:?}"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl IpNet {
    /// Whether `ip` lies in this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped and NAT64 IPv6 addresses are judged as the IPv4 address inside them.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            ip
        }
        v4 => v4,
    }
}

/// True for every address a callback must not reach by default.
pub fn is_internal(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space 100.64/10
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
                || o[0] >= 240 // reserved
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_multicast()
                || s[..6] == [0; 6] // IPv4-compatible ::/96, with :: and ::1
                || (s[0] & 0xfe00) == 0xfc00 // unique local, incl. fd00:ec2::254 (metadata)
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                // Transition ranges tunnel to an IPv4 address, or through a relay, that the
                // policy cannot judge: 6to4, Teredo and local-use NAT64.
                || s[0] == 0x2002 // 6to4 2002::/16
                || (s[0] == 0x2001 && s[1] == 0) // Teredo 2001::/32
                || s[..3] == [0x64, 0xff9b, 1] // local-use NAT64 64:ff9b:1::/48
        }
    }
}

/// The ports a callback may use on a public address; an allowlisted address may use any.
pub const PUBLIC_PORTS: [u16; 2] = [80, 443];

/// The callback address policy: public addresses on ports 80 and 443, plus whatever the
/// allowlist names, on any port.
#[derive(Clone, Debug, Default)]
pub struct CallbackPolicy {
    allow: Vec<IpNet>,
}

impl CallbackPolicy {
    /// Public addresses, plus the internal networks in `allow`.
    pub fn new(allow: Vec<IpNet>) -> Self {
        Self { allow }
    }

    /// Whether a callback may connect to `ip` on one of the [`PUBLIC_PORTS`].
    pub fn allows(&self, ip: IpAddr) -> bool {
        !is_internal(ip) || self.allowlisted(ip)
    }

    /// Whether the allowlist names `ip`: a callback may then connect to it on any port.
    pub fn allowlisted(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|net| net.contains(ip))
    }

    /// Whether a callback may connect to `addr`: a public address on port 80 or 443, or an
    /// allowlisted address on any port.
    pub fn allows_socket(&self, addr: SocketAddr) -> bool {
        if PUBLIC_PORTS.contains(&addr.port()) {
            self.allows(addr.ip())
        } else {
            self.allowlisted(addr.ip())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_ranges_are_refused_by_default() {
        let policy = CallbackPolicy::default();
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!policy.allows(ip(refused)), "{refused} must be refused");
        }
        for allowed in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(policy.allows(ip(allowed)), "{allowed} must be allowed");
        }
    }

    #[test]
    fn the_allowlist_opens_named_ranges_only() {
        let policy = CallbackPolicy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "fd12::/16".parse().unwrap(),
        ]);
        assert!(policy.allows(ip("127.0.0.1")));
        assert!(policy.allows(ip("::ffff:127.0.0.2")));
        assert!(policy.allows(ip("fd12::5")));
        assert!(!policy.allows(ip("10.0.0.1")));
        assert!(!policy.allows(ip("169.254.169.254")));
        assert!(policy.allowlisted(ip("127.0.0.1")));
        assert!(
            !policy.allowlisted(ip("8.8.8.8")),
            "public is not allowlisted"
        );
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nonsense".parse::<IpNet>().is_err());
        assert_eq!(
            "10.0.0.1".parse::<IpNet>().unwrap(),
            IpNet {
                addr: ip("10.0.0.1"),
                prefix: 32
            }
        );
    }

    #[test]
    fn ipv6_transition_ranges_are_refused() {
        let policy = CallbackPolicy::default();
        for refused in [
            "2002:7f00:1::1",                       // 6to4 for 127.0.0.1
            "2002:a9fe:a9fe::1",                    // 6to4 for 169.254.169.254
            "2002:808:808::1",                      // 6to4, even for a public IPv4 address
            "2001:0:4136:e378:8000:63bf:3fff:fdd2", // Teredo
            "2001::1",
            "64:ff9b:1::a9fe:a9fe", // local-use NAT64
            "64:ff9b:1:ffff::1",
            "::7f00:1",        // IPv4-compatible 127.0.0.1
            "::a00:1",         // IPv4-compatible 10.0.0.1
            "::808:808",       // IPv4-compatible, even for a public IPv4 address
            "::ffff",          // inside ::/96 too
            "64:ff9b::7f00:1", // well-known NAT64 of 127.0.0.1
            "64:ff9b::a00:1",  // well-known NAT64 of 10.0.0.1
        ] {
            assert!(is_internal(ip(refused)), "{refused} must be internal");
            assert!(!policy.allows(ip(refused)), "{refused} must be refused");
        }
        for allowed in [
            "64:ff9b::808:808",     // well-known NAT64 of 8.8.8.8: judged as 8.8.8.8
            "2001:4860:4860::8888", // in 2001::/16, not in Teredo's 2001::/32
            "2003::1",
        ] {
            assert!(policy.allows(ip(allowed)), "{allowed} must be allowed");
        }
    }

    #[test]
    fn public_addresses_take_ports_80_and_443_only() {
        let socket = |s: &str| s.parse::<SocketAddr>().unwrap();
        let policy = CallbackPolicy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "93.184.216.0/24".parse().unwrap(),
        ]);
        for allowed in [
            "8.8.8.8:80",
            "8.8.8.8:443",
            "[2606:4700:4700::1111]:443",
            "127.0.0.1:8080", // allowlisted: any port
            "127.0.0.1:80",
            "93.184.216.34:8443", // public but allowlisted: any port
            "[::ffff:127.0.0.1]:9000",
        ] {
            assert!(policy.allows_socket(socket(allowed)), "{allowed}");
        }
        for refused in [
            "8.8.8.8:8080",
            "8.8.8.8:22",
            "8.8.8.8:0",
            "[2606:4700:4700::1111]:8443",
            "10.0.0.1:80", // internal, not allowlisted: no port helps
            "169.254.169.254:80",
            "[::1]:443",
        ] {
            assert!(!policy.allows_socket(socket(refused)), "{refused}");
        }
        let default = CallbackPolicy::default();
        assert!(default.allows_socket(socket("8.8.8.8:443")));
        assert!(!default.allows_socket(socket("8.8.8.8:8443")));
        assert!(!default.allows_socket(socket("127.0.0.1:80")));
    }
}
