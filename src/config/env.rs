//! `${VAR}` expansion against an injectable environment, so tests pass a map.

use std::collections::HashMap;

/// Where `${VAR}` values come from.
pub trait Env {
    /// The value of `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Replaces every `${NAME}` in `input`; `$${` stands for a literal `${`.
/// The error is the message to attach to the key being expanded.
pub fn expand(input: &str, env: &dyn Env) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(stripped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = stripped;
        } else if let Some(body) = after.strip_prefix("${") {
            let end = body
                .find('}')
                .ok_or_else(|| "unterminated ${...} reference".to_string())?;
            let name = &body[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid variable name {name:?} in ${{...}}"));
            }
            let value = env
                .var(name)
                .ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> HashMap<String, String> {
        HashMap::from([("A".to_string(), "alpha".to_string())])
    }

    #[test]
    fn expands_known_variables_and_keeps_plain_text() {
        assert_eq!(expand("x-${A}-y", &env()).unwrap(), "x-alpha-y");
        assert_eq!(expand("no vars $ here", &env()).unwrap(), "no vars $ here");
        assert_eq!(expand("$${A}", &env()).unwrap(), "${A}");
    }

    #[test]
    fn missing_variable_is_named() {
        let err = expand("${NOPE}", &env()).unwrap_err();
        assert!(err.contains("NOPE"), "{err}");
        assert!(expand("${A", &env()).is_err());
        assert!(expand("${A-B}", &env()).is_err());
    }
}
