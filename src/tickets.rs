//! Session-ticket keys shared by every replica (`tls.ticket_keys`): a ticket one limen process
//! issued is resumed by any other that has the same file, and survives a restart.
//!
//! Owns: the key file's format (lines of base64 of 80 random bytes; the first encrypts, all
//! decrypt), deriving each line's key id and AES-256-GCM key with HKDF-SHA256, and the ticketer
//! rustls calls. Must not touch: reading the file (the reloader does, as a watched secret).

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hkdf::{KeyType, Salt, HKDF_SHA256};
use base64::Engine;

/// Random bytes per line.
pub const KEY_BYTES: usize = 80;
const NAME_LEN: usize = 16;
/// Tickets say they last this long; a client keeps them no longer. Rotation of the file bounds
/// what a leaked key exposes, not this.
const LIFETIME_SECS: u32 = 6 * 3600;

const HEAD_LEN: usize = NAME_LEN + 8 + NONCE_LEN;

fn unix_now() -> Option<u64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

fn aad(name: &[u8], issued: &[u8]) -> [u8; NAME_LEN + 8] {
    let mut a = [0u8; NAME_LEN + 8];
    a[..NAME_LEN].copy_from_slice(name);
    a[NAME_LEN..].copy_from_slice(issued);
    a
}

struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

struct TicketKey {
    name: [u8; NAME_LEN],
    key: RandomizedNonceKey,
}

/// The keys of one version of the file, the encrypting one first.
pub struct TicketKeys {
    keys: Vec<TicketKey>,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TicketKeys({} keys)", self.keys.len())
    }
}

impl TicketKeys {
    /// Parses a key file. Blank lines and `#` comments are skipped.
    pub fn parse(text: &[u8]) -> Result<TicketKeys, String> {
        let text = std::str::from_utf8(text).map_err(|_| "the file is not text".to_string())?;
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let raw = base64::engine::general_purpose::STANDARD
                .decode(line)
                .map_err(|_| format!("line {}: not base64; make a key with `openssl rand -base64 80 | tr -d '\\n'`", i + 1))?;
            if raw.len() != KEY_BYTES {
                return Err(format!(
                    "line {}: decodes to {} bytes, not {KEY_BYTES}; make a key with `openssl rand -base64 80 | tr -d '\\n'`",
                    i + 1,
                    raw.len()
                ));
            }
            keys.push(derive(&raw).ok_or("cannot derive a ticket key")?);
        }
        if keys.is_empty() {
            return Err("no key in the file: each line is the base64 of 80 random bytes".into());
        }
        Ok(TicketKeys { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn derive(raw: &[u8]) -> Option<TicketKey> {
    let prk = Salt::new(HKDF_SHA256, b"limen session tickets v1").extract(raw);
    let mut name = [0u8; NAME_LEN];
    prk.expand(&[b"key name"], Len(NAME_LEN))
        .ok()?
        .fill(&mut name)
        .ok()?;
    let mut key = [0u8; 32];
    prk.expand(&[b"aes-256-gcm key"], Len(32))
        .ok()?
        .fill(&mut key)
        .ok()?;
    let key = RandomizedNonceKey::new(&AES_256_GCM, &key).ok()?;
    Some(TicketKey { name, key })
}

/// The ticketer of every `ServerConfig`: the shared keys when a file is loaded, else the
/// per-process rotating one rustls provides.
#[derive(Debug)]
pub struct Ticketer {
    keys: ArcSwapOption<TicketKeys>,
    own: Arc<dyn rustls::server::ProducesTickets>,
}

impl Ticketer {
    pub fn new(own: Arc<dyn rustls::server::ProducesTickets>) -> Ticketer {
        Ticketer {
            keys: ArcSwapOption::empty(),
            own,
        }
    }

    /// New keys (None: back to the per-process ticketer) for tickets issued and read from now on.
    pub fn set(&self, keys: Option<Arc<TicketKeys>>) {
        self.keys.store(keys);
    }

    pub fn shared(&self) -> bool {
        self.keys.load().is_some()
    }
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        match &*self.keys.load() {
            Some(_) => LIFETIME_SECS,
            None => self.own.lifetime(),
        }
    }

    /// `name || issued || nonce || AES-256-GCM(plain)`, name and issue time (Unix seconds)
    /// authenticated as AAD.
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.load();
        let Some(keys) = &*keys else {
            return self.own.encrypt(plain);
        };
        let k = keys.keys.first()?;
        let issued = unix_now()?.to_be_bytes();
        let mut sealed = plain.to_vec();
        let nonce = k
            .key
            .seal_in_place_append_tag(Aad::from(aad(&k.name, &issued)), &mut sealed)
            .ok()?;
        let mut out = Vec::with_capacity(HEAD_LEN + sealed.len());
        out.extend_from_slice(&k.name);
        out.extend_from_slice(&issued);
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&sealed);
        Some(out)
    }

    /// A ticket of an unknown key, or one that does not authenticate, is None: a full handshake.
    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.load();
        let Some(keys) = &*keys else {
            return self.own.decrypt(cipher);
        };
        let (name, rest) = cipher.split_at_checked(NAME_LEN)?;
        let (issued, rest) = rest.split_at_checked(8)?;
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN)?;
        let k = keys.keys.iter().find(|k| k.name == name)?;
        // rustls checks a ticket's age only for early data: limen enforces the lifetime it
        // announced, so a key left in the file does not resume sessions for ever.
        let at = u64::from_be_bytes(issued.try_into().ok()?);
        let now = unix_now()?;
        if now.saturating_sub(at) > u64::from(LIFETIME_SECS) || at > now + 60 {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = k
            .key
            .open_in_place(nonce, Aad::from(aad(&k.name, issued)), &mut buf)
            .ok()?;
        let n = plain.len();
        buf.truncate(n);
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    fn line(seed: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([seed; KEY_BYTES])
    }

    fn ticketer(text: &str) -> Ticketer {
        let t = Ticketer::new(rustls::crypto::aws_lc_rs::Ticketer::new().unwrap());
        t.set(Some(Arc::new(TicketKeys::parse(text.as_bytes()).unwrap())));
        t
    }

    #[test]
    fn the_first_key_encrypts_and_every_key_decrypts() {
        let old = ticketer(&line(1));
        let ticket = old.encrypt(b"session state").unwrap();
        // Rotation: a new key prepended; the old one still reads tickets it sealed.
        let rotated = ticketer(&format!("# rotated\n{}\n\n{}\n", line(2), line(1)));
        assert_eq!(rotated.decrypt(&ticket).unwrap(), b"session state");
        let newer = rotated.encrypt(b"x").unwrap();
        assert_eq!(
            old.decrypt(&newer),
            None,
            "the old file does not know the new key"
        );
        // The old key dropped: its tickets mean a full handshake.
        assert_eq!(ticketer(&line(2)).decrypt(&ticket), None);
    }

    #[test]
    fn tampered_old_or_short_tickets_are_refused() {
        let t = ticketer(&line(3));
        let mut ticket = t.encrypt(b"state").unwrap();
        // Issued seven hours ago (past the 6 h lifetime): the time is authenticated, so changing
        // it fails as well as being too old.
        let mut old = ticket.clone();
        let then = (unix_now().unwrap() - 7 * 3600).to_be_bytes();
        old[NAME_LEN..NAME_LEN + 8].copy_from_slice(&then);
        assert_eq!(t.decrypt(&old), None);
        let last = ticket.len() - 1;
        ticket[last] ^= 1;
        assert_eq!(t.decrypt(&ticket), None);
        assert_eq!(t.decrypt(&ticket[..20]), None);
        assert_eq!(t.decrypt(b""), None);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        assert!(TicketKeys::parse(b"not base64!")
            .unwrap_err()
            .contains("line 1"));
        let short = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
        assert!(TicketKeys::parse(short.as_bytes())
            .unwrap_err()
            .contains("32 bytes"));
        assert!(TicketKeys::parse(b"# only a comment\n")
            .unwrap_err()
            .contains("no key"));
    }
}
