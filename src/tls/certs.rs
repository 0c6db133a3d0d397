//! Certificate loading: where cert/key pairs live on disk, reading and parsing them into a
//! `LoadedCert` (PEM chain, key, the key/cert match, the leaf's names, expiry, serial and hash),
//! and the in-memory self-signed development certificate.
//!
//! Owns: the cert directory layout rules (`scan_dir`), PEM and X.509 parsing, RFC 6125 name
//! matching. Must not touch: which certificate serves which name (`store`), rustls configs
//! (`server`, `upstream`), the published snapshot, sockets.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsError;
use crate::config::{CertPair, TlsSettings};

/// One certificate with its key, as loaded.
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// Lower-case DNS names, wildcards as `*.parent`.
    pub names: Vec<String>,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// SHA-256 of the leaf certificate (DER), lower-case hex: what replicas compare.
    pub sha256: String,
    /// The leaf's serial number, lower-case hex.
    pub serial: String,
}

impl fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedCert")
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .field("cert_file", &self.cert_file)
            .finish()
    }
}

impl LoadedCert {
    /// True when this certificate is valid for `host` (lower case, no port).
    pub fn covers(&self, host: &str) -> bool {
        self.names.iter().any(|n| name_matches(n, host))
    }
}

/// RFC 6125 matching: exact, or `*.parent` for exactly one label above `parent`.
pub fn name_matches(pattern: &str, host: &str) -> bool {
    if let Some(parent) = pattern.strip_prefix("*.") {
        match host.split_once('.') {
            Some((label, rest)) => !label.is_empty() && rest.eq_ignore_ascii_case(parent),
            None => false,
        }
    } else {
        pattern.eq_ignore_ascii_case(host)
    }
}

/// Where one cert/key pair lives on disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CertSource {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Lists the cert/key pairs the settings name: explicit pairs, then each cert dir's entries.
pub fn discover(settings: &TlsSettings) -> (Vec<CertSource>, Vec<TlsError>) {
    let mut found: Vec<CertSource> = settings
        .certs
        .iter()
        .map(|CertPair { cert, key }| CertSource {
            cert: cert.clone(),
            key: key.clone(),
        })
        .collect();
    let mut errors = Vec::new();
    for dir in &settings.cert_dirs {
        match scan_dir(dir) {
            Ok(mut v) => found.append(&mut v),
            Err(e) => errors.push(e),
        }
    }
    (found, errors)
}

/// One directory: itself as a Kubernetes TLS secret, its sub-directories as secrets, and its
/// `NAME.crt`/`NAME.pem` + `NAME.key` pairs. Dot entries (`..data`, editors' temp files) are skipped.
/// Costs one `readdir` plus a `stat` per symlink and per sub-directory: it runs at every poll.
pub fn scan_dir(dir: &Path) -> Result<Vec<CertSource>, TlsError> {
    let dir_err = |e: std::io::Error| TlsError::Dir {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let secret = |d: &Path| {
        let (c, k) = (d.join("tls.crt"), d.join("tls.key"));
        (c.is_file() && k.is_file()).then_some(CertSource { cert: c, key: k })
    };
    let mut files: HashSet<String> = HashSet::new();
    let mut subdirs: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_err)? {
        let entry = entry.map_err(dir_err)?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let Ok(ft) = entry.file_type() else {
            continue;
        };
        // Symlinks are followed, as the Kubernetes layout needs.
        let is_dir = if ft.is_symlink() {
            std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir())
        } else {
            ft.is_dir()
        };
        if is_dir {
            subdirs.push(entry.path());
        } else {
            files.insert(name);
        }
    }
    let mut out = Vec::new();
    if files.contains("tls.crt") && files.contains("tls.key") {
        out.push(CertSource {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        });
    }
    subdirs.sort();
    for d in subdirs {
        out.extend(secret(&d));
    }
    let mut pairs: Vec<(&str, &str)> = files
        .iter()
        .filter_map(|name| {
            let stem = name
                .strip_suffix(".crt")
                .or_else(|| name.strip_suffix(".pem"))?;
            (stem != "tls" || !files.contains("tls.key") || !name.ends_with(".crt"))
                .then_some((stem, name.as_str()))
        })
        .filter(|(stem, _)| files.contains(&format!("{stem}.key")))
        .collect();
    pairs.sort();
    for (stem, name) in pairs {
        out.push(CertSource {
            cert: dir.join(name),
            key: dir.join(format!("{stem}.key")),
        });
    }
    Ok(out)
}

/// Reads a certificate or key file, naming it in the error.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::config::read_regular(path, crate::config::MAX_SECRET_BYTES).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// An encrypted PEM key (PKCS#8 `ENCRYPTED PRIVATE KEY`, or OpenSSL's legacy `Proc-Type:
/// 4,ENCRYPTED` header) that would otherwise be reported as "no key found".
fn is_encrypted_key(pem: &[u8]) -> bool {
    let has = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    has(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || has(b"Proc-Type: 4,ENCRYPTED")
}

/// The certificate chain and private key of a pair already read, each refused by its file's
/// name: bad PEM, no certificate, an encrypted key, no key. Shared by the serving pairs and the
/// client pair limen shows upstreams.
pub(super) fn chain_and_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    src: &CertSource,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadPem {
            path: src.cert.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: src.cert.clone(),
        });
    }
    if is_encrypted_key(key_pem) {
        return Err(TlsError::EncryptedKey {
            path: src.key.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: src.key.clone(),
        },
        other => TlsError::BadPem {
            path: src.key.clone(),
            reason: other.to_string(),
        },
    })?;
    Ok((chain, key))
}

/// Parses a pair already read: the PEM chain, the key, that they match, the leaf's names and expiry.
pub fn parse_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
    src: &CertSource,
    provider: &CryptoProvider,
) -> Result<LoadedCert, TlsError> {
    let (chain, key) = chain_and_key(cert_pem, key_pem, src)?;
    let (names, not_after) = leaf_facts(&chain[0]).map_err(|reason| TlsError::BadX509 {
        path: src.cert.clone(),
        reason,
    })?;
    let serial = x509_parser::parse_x509_certificate(&chain[0])
        .map(|(_, c)| hex(c.raw_serial()))
        .unwrap_or_default();
    let sha256 = hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &chain[0]).as_ref());
    if names.is_empty() {
        return Err(TlsError::NoNames {
            path: src.cert.clone(),
        });
    }
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::BadKey {
            path: src.key.clone(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(TlsError::KeyMismatch {
                cert: src.cert.clone(),
                key: src.key.clone(),
            })
        }
    }
    Ok(LoadedCert {
        key: Arc::new(certified),
        names,
        not_after,
        cert_file: src.cert.clone(),
        key_file: src.key.clone(),
        sha256,
        serial,
    })
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The DNS names (subjectAltName, else the common name) and notAfter of a leaf certificate.
pub fn leaf_facts(der: &[u8]) -> Result<(Vec<String>, i64), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let GeneralName::DNSName(n) = gn {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    names.sort();
    names.dedup();
    Ok((names, cert.validity().not_after.timestamp()))
}

/// Generates an in-memory self-signed certificate for `hosts` (development only).
pub fn self_signed(hosts: &[String], provider: &CryptoProvider) -> Result<LoadedCert, TlsError> {
    let err = |e: &dyn fmt::Display| TlsError::SelfSigned {
        reason: e.to_string(),
    };
    let mut sans: Vec<String> = hosts.to_vec();
    for extra in ["127.0.0.1", "::1"] {
        if !sans.iter().any(|s| s == extra) {
            sans.push(extra.to_string());
        }
    }
    let generated = rcgen::generate_simple_self_signed(sans).map_err(|e| err(&e))?;
    let src = CertSource {
        cert: PathBuf::from("(self-signed, in memory)"),
        key: PathBuf::from("(self-signed, in memory)"),
    };
    parse_pair(
        generated.cert.pem().as_bytes(),
        generated.signing_key.serialize_pem().as_bytes(),
        &src,
        provider,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matches_one_label() {
        assert!(name_matches("*.example.test", "a.example.test"));
        assert!(!name_matches("*.example.test", "a.b.example.test"));
        assert!(!name_matches("*.example.test", "example.test"));
        assert!(name_matches("a.example.test", "A.example.test"));
    }
}
