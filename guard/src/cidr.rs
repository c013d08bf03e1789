//! IPv4/IPv6 CIDR prefixes as operators write them (`10.0.0.0/8`,
//! `2001:db8::/32`, or a bare address for a single host).
//!
//! Kept here rather than taken from `ipnet`: a prefix is masked when it is
//! made, so two spellings of one network are one map key and one entry in
//! the config's record of what it added; a bare address is a host; and a
//! refusal names the bad part for the config error. `ipnet` keeps host
//! bits and wants an explicit length, so wrapping it would add code, not
//! remove it.

use std::{fmt, net::IpAddr, str::FromStr};

/// A network prefix. The address is kept masked to its prefix length, so two
/// spellings of one network compare equal.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

/// Why a string is not a CIDR.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    /// The address part does not parse.
    #[error("`{0}` is not an IPv4 or IPv6 address")]
    Address(String),
    /// The prefix length is not a number in range for the family.
    #[error("`{input}` has a bad prefix length: expected 0..={max}")]
    PrefixLen {
        /// What was given.
        input: String,
        /// The family's maximum.
        max: u8,
    },
}

impl Cidr {
    /// A prefix of `prefix_len` bits of `addr`; host bits are cleared.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, CidrError> {
        let max = max_len(&addr);
        if prefix_len > max {
            return Err(CidrError::PrefixLen {
                input: format!("{addr}/{prefix_len}"),
                max,
            });
        }
        Ok(Self {
            addr: mask(addr, prefix_len),
            prefix_len,
        })
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` lies inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        max_len(&ip) == max_len(&self.addr) && mask(ip, self.prefix_len) == self.addr
    }
}

fn max_len(addr: &IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// Clears every bit of `addr` past the first `prefix_len`.
pub fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6((bits & m).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| CidrError::Address(addr.to_string()))?;
        let max = max_len(&addr);
        let prefix_len =
            match len {
                None => max,
                Some(l) => l.trim().parse::<u8>().ok().filter(|l| *l <= max).ok_or(
                    CidrError::PrefixLen {
                        input: s.to_string(),
                        max,
                    },
                )?,
            };
        Self::new(addr, prefix_len)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_masks() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        let c: Cidr = "2001:db8::1/32".parse().unwrap();
        assert_eq!(c.to_string(), "2001:db8::/32");
        assert_eq!("192.0.2.7".parse::<Cidr>().unwrap().prefix_len(), 32);
        assert_eq!("::1".parse::<Cidr>().unwrap().prefix_len(), 128);
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert_eq!("::/0".parse::<Cidr>().unwrap().to_string(), "::/0");
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::PrefixLen { .. })
        ));
        assert!(matches!(
            "::/129".parse::<Cidr>(),
            Err(CidrError::PrefixLen { .. })
        ));
        assert!(matches!(
            "10.0.0.0/x".parse::<Cidr>(),
            Err(CidrError::PrefixLen { .. })
        ));
        assert!(matches!(
            "10.0.0/8".parse::<Cidr>(),
            Err(CidrError::Address(_))
        ));
        assert!(matches!("".parse::<Cidr>(), Err(CidrError::Address(_))));
        assert!(matches!(
            "host/8".parse::<Cidr>(),
            Err(CidrError::Address(_))
        ));
    }

    #[test]
    fn contains() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.200.1.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::a00:1".parse().unwrap()));
        let all: Cidr = "::/0".parse().unwrap();
        assert!(all.contains("2001:db8::1".parse().unwrap()));
    }
}
