//! `request_id`: the header that carries a request's id, and whose incoming value is kept.
//!
//! Owns: the setting's syntax and defaults. Must not touch: making or checking ids (the request
//! path does).

use http::HeaderName;
use serde::{de, Deserialize, Deserializer};

/// Whose incoming request id is kept; anyone else's is replaced by a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trust {
    /// Only a peer in `trusted_proxies` (a balancer or proxy in front that made or kept it).
    #[default]
    TrustedProxies,
    All,
    None,
}

impl<'de> Deserialize<'de> for Trust {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "trusted_proxies" => Ok(Trust::TrustedProxies),
            "all" => Ok(Trust::All),
            "none" => Ok(Trust::None),
            other => Err(de::Error::custom(format!(
                "request_id.trust {other:?} must be trusted_proxies, all or none"
            ))),
        }
    }
}

/// A header name for the id: any field name but the ones that frame, route or authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IdHeader(HeaderName);

impl<'de> Deserialize<'de> for IdHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let name = HeaderName::from_bytes(s.as_bytes()).map_err(|_| {
            de::Error::custom(format!("request_id.header {s:?} is not a header name"))
        })?;
        const TAKEN: &[&str] = &[
            "host",
            "content-length",
            "transfer-encoding",
            "connection",
            "te",
            "upgrade",
            "authorization",
            "cookie",
            "set-cookie",
            "x-forwarded-for",
            "forwarded",
            "x-forwarded-user",
        ];
        if TAKEN.contains(&name.as_str()) {
            return Err(de::Error::custom(format!(
                "request_id.header {s:?} carries something else; use a header of its own such as x-request-id"
            )));
        }
        Ok(IdHeader(name))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRequestId {
    header: Option<IdHeader>,
    trust: Option<Trust>,
}

/// `request_id`: on for every request; only where the incoming value comes from is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId {
    pub header: HeaderName,
    pub trust: Trust,
}

impl Default for RequestId {
    fn default() -> RequestId {
        RequestId {
            header: HeaderName::from_static("x-request-id"),
            trust: Trust::default(),
        }
    }
}

pub(super) fn request_id_from(raw: Option<RawRequestId>) -> RequestId {
    let raw = raw.unwrap_or_default();
    RequestId {
        header: raw
            .header
            .map_or_else(|| RequestId::default().header, |h| h.0),
        trust: raw.trust.unwrap_or_default(),
    }
}
