//! API tokens and roles.
//!
//! A token is a name, a role and a secret; the server keeps only the sha256 of the secret. A
//! request carries `Authorization: Bearer SECRET`; the server hashes it and looks the hash up.
//! Roles are ordered: a `viewer` reads, an `operator` also uploads bundles and stages them, an
//! `admin` also manages tokens.
//!
//! Tokens come from a file (`--tokens FILE`, lines `NAME ROLE SECRET`, `#` comments), from the
//! store (tokens created through `POST /api/v1/tokens`), or — on a first start without a file
//! and with no stored token — from a generated admin token that is printed once.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role '{other}' (expected viewer, operator or admin)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("token file {path}, line {line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
}

/// A token as written in a token file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLine {
    pub name: String,
    pub role: Role,
    pub secret: String,
}

/// Shortest secret accepted from a token file.
pub const MIN_SECRET_LEN: usize = 16;

/// Reads a token file: `NAME ROLE SECRET` per line, blank lines and `#` comments ignored.
pub fn read_token_file(path: &Path) -> Result<Vec<TokenLine>, TokenFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_token_lines(&text).map_err(|(line, reason)| TokenFileError::Line {
        path: shown,
        line,
        reason,
    })
}

/// Parses token file text; an error names the (1-based) line.
pub fn parse_token_lines(text: &str) -> Result<Vec<TokenLine>, (usize, String)> {
    let mut out: Vec<TokenLine> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, role, secret] = fields[..] else {
            return Err((i + 1, "expected NAME ROLE SECRET".into()));
        };
        let role = role.parse().map_err(|e| (i + 1, e))?;
        if secret.len() < MIN_SECRET_LEN {
            return Err((
                i + 1,
                format!("secret is shorter than {MIN_SECRET_LEN} characters"),
            ));
        }
        if out.iter().any(|t| t.name == name) {
            return Err((i + 1, format!("token name '{name}' appears twice")));
        }
        out.push(TokenLine {
            name: name.to_string(),
            role,
            secret: secret.to_string(),
        });
    }
    Ok(out)
}

/// sha256 (hex) of a token secret: what the store keeps.
pub fn hash_secret(secret: &str) -> String {
    protocol::link::sha256_hex(secret.as_bytes())
}

/// A new random secret: `mf_` and 64 hex digits.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).expect("the OS random source works");
    format!("mf_{}", hex::encode(bytes))
}

/// Who a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// The tokens in force, indexed by the hash of their secret.
#[derive(Debug, Default, Clone)]
pub struct TokenIndex {
    by_hash: HashMap<String, Caller>,
}

impl TokenIndex {
    pub fn new(tokens: impl IntoIterator<Item = (String, Role, String)>) -> TokenIndex {
        TokenIndex {
            by_hash: tokens
                .into_iter()
                .map(|(name, role, hash)| (hash, Caller { name, role }))
                .collect(),
        }
    }

    /// The caller a bearer secret belongs to.
    pub fn check(&self, secret: &str) -> Option<&Caller> {
        self.by_hash.get(&hash_secret(secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lines_parse_and_errors_name_the_line() {
        let text =
            "# ops\nci operator 0123456789abcdef0123\n\n root admin  fedcba9876543210fedc # x\n";
        let t = parse_token_lines(text).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].role, Role::Admin);
        assert_eq!(t[1].secret, "fedcba9876543210fedc");
        assert_eq!(
            parse_token_lines("a boss 0123456789abcdef0123")
                .unwrap_err()
                .0,
            1
        );
        assert!(parse_token_lines("\na viewer short")
            .unwrap_err()
            .1
            .contains("shorter"));
        assert!(parse_token_lines("a viewer").is_err());
    }

    #[test]
    fn roles_are_ordered_and_index_finds_by_secret() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        let secret = generate_secret();
        let idx = TokenIndex::new([("ci".to_string(), Role::Operator, hash_secret(&secret))]);
        assert_eq!(idx.check(&secret).unwrap().name, "ci");
        assert!(idx.check("nope").is_none());
    }
}
