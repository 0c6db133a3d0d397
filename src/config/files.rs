//! Reading the config's files and saying what is wrong with them: the error type every config
//! problem is reported in (with file, line and column where there is one), the size and type rules
//! for every file limen reads after start, and the text of a config or routes file.
//!
//! Owns: [`ConfigError`], [`FileError`], [`read_regular`] and its limits, and turning a YAML syntax
//! error into `file:line:column: message`. Must not touch: what the text means (that is `raw` and
//! `build`), or any file but the one it is asked to read.

use std::path::{Path, PathBuf};

/// A problem with the config file. Its `Display` names the file, the line and column where there
/// is one, what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {source}. Check the path given to --config.")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{path}: {message}")]
    Rule { path: PathBuf, message: String },
    /// A file refused for its permissions; the message names it.
    #[error("{0}")]
    Refused(String),
    #[error("{path}: {reason}")]
    NotReadable { path: PathBuf, reason: FileError },
}

/// Why a watched file was not read. The poller reads only regular files, and only up to a limit,
/// so a FIFO, a device or a runaway file can neither block it nor exhaust its memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error(
        "is a {0}, not a regular file; limen reads only regular files (symlinks are followed)"
    )]
    NotRegular(&'static str),
    #[error(
        "is {size} bytes, over the {limit}-byte limit for this kind of file; is it the right file?"
    )]
    TooLarge { size: u64, limit: u64 },
    #[error("cannot read: {0}")]
    Io(String),
}

/// Largest config file read (a ConfigMap holds at most 1 MiB, so this leaves room).
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;
/// Largest certificate, key, CA bundle or ticket-key file read: the Kubernetes Secret limit.
pub const MAX_SECRET_BYTES: u64 = 1024 * 1024;

/// Reads a whole regular file of at most `limit` bytes. Opened non-blocking, so a FIFO swapped in
/// under the name cannot hang the open, then checked on the open handle (no race with a rename).
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let io = |e: std::io::Error| FileError::Io(e.to_string());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(FileError::NotRegular(if ft.is_dir() {
            "directory"
        } else if ft.is_fifo() {
            "FIFO"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_char_device() || ft.is_block_device() {
            "device"
        } else {
            "special file"
        }));
    }
    if meta.len() > limit {
        return Err(FileError::TooLarge {
            size: meta.len(),
            limit,
        });
    }
    // The file may grow between the stat and the read: never read more than the limit.
    let mut out = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut out).map_err(io)?;
    if out.len() as u64 > limit {
        return Err(FileError::TooLarge {
            size: out.len() as u64,
            limit,
        });
    }
    Ok(out)
}

/// A config or routes file's text: a regular file within the size limit, in UTF-8.
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    let bytes = match read_regular(path, MAX_CONFIG_BYTES) {
        Ok(b) => b,
        Err(FileError::Io(msg)) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::other(msg),
            })
        }
        Err(reason) => {
            return Err(ConfigError::NotReadable {
                path: path.to_path_buf(),
                reason,
            })
        }
    };
    String::from_utf8(bytes).map_err(|_| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: "the file is not UTF-8 text".into(),
    })
}

pub(super) fn syntax_error(path: &Path, e: &serde_saphyr::Error) -> ConfigError {
    // No excerpt of the source, and no value quoted from it: the file may not be what it seems
    // (a link to a key), and the message goes to the log and the status page. The position
    // says where.
    let text = without_quoted_values(&e.without_snippet().to_string());
    let text = text.trim_end();
    let Some(loc) = e.location() else {
        return ConfigError::Syntax {
            path: path.to_path_buf(),
            message: text.to_string(),
        };
    };
    // The crate prefixes "error: line L column C: "; the location goes in front as file:line:col,
    // and the snippet that follows names the file instead of "<input>".
    let body = text
        .split_once(": ")
        .and_then(|(_, rest)| rest.split_once(": "))
        .filter(|_| text.starts_with("error: line "))
        .map_or(text, |(_, rest)| rest);
    ConfigError::Invalid {
        path: path.to_path_buf(),
        line: loc.line(),
        column: loc.column(),
        message: body.replace("<input>", &path.display().to_string()),
    }
}

/// serde's type and value errors quote what they found (`invalid type: string "...", expected a
/// sequence`): the quoted value goes, the rest stays.
fn without_quoted_values(text: &str) -> String {
    let Some(at) = text
        .find("invalid type: ")
        .or_else(|| text.find("invalid value: "))
    else {
        return text.to_owned();
    };
    let Some(expected) = text[at..].rfind(", expected ") else {
        return text.to_owned();
    };
    let head = &text[..at];
    let kind = if text[at..].starts_with("invalid type") {
        "invalid type"
    } else {
        "invalid value"
    };
    format!("{head}{kind}{}", &text[at + expected..])
}
