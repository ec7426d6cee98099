//! Who may read spark's own routes. When llama-server is given API keys (`--api-key` or
//! `--api-key-file` after `--`, or `LLAMA_API_KEY` / `LLAMA_ARG_API_KEY_FILE` in the environment
//! it inherits from spark), `/spark/status` and `/spark/metrics` ask for one of the same keys, the
//! way llama-server asks: `Authorization: Bearer <key>`, else `X-Api-Key: <key>`.
//!
//! Owns the key set and the check. Never keeps a key in the clear: only SHA-256 digests are
//! held, and a presented key is compared with every digest in constant time (no early exit on
//! the first differing byte or on the first matching key).

use std::path::PathBuf;

use hyper::header::{HeaderMap, AUTHORIZATION};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("read the API keys of llama-server from {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} after -- needs a value")]
    Missing(String),
}

/// The API keys llama-server will accept, as digests.
#[derive(Debug, Default, Clone)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

/// One `--api-key` value: a comma-separated row where a field may be double-quoted (`""` is a
/// quote inside quotes), as llama-server splits it. Empty fields are dropped.
fn split_row(value: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if !quoted && field.is_empty() => quoted = true,
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' if quoted => quoted = false,
            ',' if !quoted => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    fields.retain(|f| !f.is_empty());
    fields
}

/// The keys of an `--api-key-file`: one per line, lines starting with `#` and empty lines
/// skipped (nothing else is trimmed, as in llama-server).
fn file_keys(path: &str) -> Result<Vec<String>, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::File {
        path: path.into(),
        source,
    })?;
    Ok(text
        .split('\n')
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

impl ApiKeys {
    /// The keys llama-server gets from `args` (the arguments after `--`) and from `env` (its
    /// environment, which it inherits from spark). Both add up, as in llama-server.
    pub fn of_llama_server(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ApiKeys, KeyError> {
        let mut keys = Vec::new();
        if let Some(v) = env("LLAMA_API_KEY") {
            keys.extend(split_row(&v));
        }
        if let Some(path) = env("LLAMA_ARG_API_KEY_FILE") {
            keys.extend(file_keys(&path)?);
        }
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            // llama-server reads `--api_key` as `--api-key`.
            let flag = match arg.starts_with("--") {
                true => arg.replace('_', "-"),
                false => continue,
            };
            match flag.as_str() {
                "--api-key" => {
                    let v = it.next().ok_or_else(|| KeyError::Missing(flag.clone()))?;
                    keys.extend(split_row(v));
                }
                "--api-key-file" => {
                    let v = it.next().ok_or_else(|| KeyError::Missing(flag.clone()))?;
                    keys.extend(file_keys(v)?);
                }
                _ => {}
            }
        }
        Ok(ApiKeys {
            digests: keys
                .iter()
                .map(|k| Sha256::digest(k.as_bytes()).into())
                .collect(),
        })
    }

    /// Whether llama-server has keys (and spark's routes want one).
    pub fn required(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Whether a request with these headers may read spark's routes.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        if !self.required() {
            return true;
        }
        let presented = match headers.get(AUTHORIZATION) {
            Some(v) if !v.is_empty() => v.as_bytes(),
            _ => headers
                .get("x-api-key")
                .map(|v| v.as_bytes())
                .unwrap_or_default(),
        };
        let key = presented.strip_prefix(b"Bearer ").unwrap_or(presented);
        let digest: [u8; 32] = Sha256::digest(key).into();
        let mut any = 0u8;
        for d in &self.digests {
            let diff = d.iter().zip(&digest).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            any |= u8::from(diff == 0);
        }
        std::hint::black_box(any) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn keys_come_from_every_place_llama_server_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# a comment\nfrom-file\n\nsecond\n").unwrap();
        let env_file = dir.path().join("env-keys");
        std::fs::write(&env_file, "from-env-file\n").unwrap();
        let env = |k: &str| match k {
            "LLAMA_API_KEY" => Some("e1,\"e,2\"".to_string()),
            "LLAMA_ARG_API_KEY_FILE" => Some(env_file.display().to_string()),
            _ => None,
        };
        let a = args(&[
            "-c",
            "2048",
            "--api_key",
            "k1,k2",
            "--api-key-file",
            file.to_str().unwrap(),
        ]);
        let keys = ApiKeys::of_llama_server(&a, env).unwrap();
        for k in [
            "k1",
            "k2",
            "from-file",
            "second",
            "e1",
            "e,2",
            "from-env-file",
        ] {
            let bearer = format!("Bearer {k}");
            assert!(keys.allows(&headers(&[("authorization", &bearer)])), "{k}");
            assert!(keys.allows(&headers(&[("x-api-key", k)])), "{k}");
        }
        for bad in ["k3", "# a comment", "", "Bearer", "k1,k2"] {
            let bearer = format!("Bearer {bad}");
            assert!(
                !keys.allows(&headers(&[("authorization", &bearer)])),
                "{bad:?}"
            );
        }
        assert!(!keys.allows(&HeaderMap::new()));
        // Authorization wins over X-Api-Key when both are sent, as in llama-server.
        assert!(!keys.allows(&headers(&[
            ("authorization", "Bearer wrong"),
            ("x-api-key", "k1")
        ])));
    }

    #[test]
    fn no_keys_means_no_check_and_a_missing_value_or_file_is_an_error() {
        let none = ApiKeys::of_llama_server(&args(&["-c", "2048"]), |_| None).unwrap();
        assert!(!none.required());
        assert!(none.allows(&HeaderMap::new()));
        let e = ApiKeys::of_llama_server(&args(&["--api-key"]), |_| None).unwrap_err();
        assert_eq!(e.to_string(), "--api-key after -- needs a value");
        let e = ApiKeys::of_llama_server(&args(&["--api-key-file", "/nonexistent/keys"]), |_| None)
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/keys"), "{e}");
    }

    #[test]
    fn rows_split_like_llama_server() {
        assert_eq!(split_row("a,b"), ["a", "b"]);
        assert_eq!(split_row("\"a,b\",c"), ["a,b", "c"]);
        assert_eq!(split_row("\"say \"\"hi\"\"\""), ["say \"hi\""]);
        assert_eq!(split_row("x\"y"), ["x\"y"]);
        assert_eq!(split_row(",,a,"), ["a"]);
    }
}
