//! Configuration: the TOML file, validated once into typed values.
//!
//! Every error names the key it is about (`routes[1].credential: …`), so an
//! operator never has to guess which line is wrong.

mod env;
mod locate;
mod raw;

pub use env::{expand, Env, ProcessEnv};
pub use raw::RawConfig;

use crate::secret::Secret;
use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default Adobe IMS token endpoint (OAuth Server-to-Server).
pub const DEFAULT_TOKEN_URL: &str = "https://ims-na1.adobelogin.com/ims/token/v3";

/// Most worker threads `server.workers` accepts: far beyond any core count, low
/// enough that a typo does not start a million threads.
const MAX_WORKERS: u64 = 1024;

/// A configuration problem, always naming the key (or the file) it is about.
///
/// Displayed as `FILE:LINE: KEY: MESSAGE` when the file and line are known
/// (`config.toml:31: routes[1].credential: no credential named "fusoin"`),
/// and as `KEY: MESSAGE` for text parsed without a file.
#[derive(Debug)]
pub struct ConfigError {
    /// The dotted key path, e.g. `routes[1].credential`; empty for a syntax
    /// error, which has a line but no key.
    pub key: String,
    /// What is wrong with it (never a value that could be a secret).
    pub message: String,
    /// The config file, when the text came from one.
    pub file: Option<PathBuf>,
    /// 1-based line of the key (or of its table when the key is missing).
    pub line: Option<usize>,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
            file: None,
            line: None,
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            // Without a file, only a syntax error (no key to name) shows its line.
            (None, Some(line)) if self.key.is_empty() => write!(f, "line {line}: ")?,
            (None, _) => {}
        }
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[ims]`.
    pub ims: ImsConfig,
    /// `[outbound]`.
    pub outbound: OutboundConfig,
    /// `[credentials.*]`, by name.
    pub credentials: BTreeMap<String, CredentialConfig>,
    /// `[[routes]]`, in file order.
    pub routes: Vec<RouteConfig>,
    /// `[access]`.
    pub access: AccessConfig,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Client-facing address.
    pub listen: SocketAddr,
    /// Admin address (/metrics, /healthz, /readyz, /tokens, /reload).
    pub admin_listen: SocketAddr,
    /// Client-facing TLS certificate and key files, when both are set.
    pub tls: Option<TlsFiles>,
    /// A client must send a whole request head within this.
    pub header_read_timeout: Duration,
    /// Idle keep-alive connections are closed after this.
    pub idle_timeout: Duration,
    /// Drain time on SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Form bodies up to this size are scrubbed; larger ones get 413.
    pub max_scrub_body_bytes: u64,
    /// Optional JSON-lines audit file.
    pub audit_log: Option<PathBuf>,
    /// Threads serving the proxy listener, each with its own runtime and upstream pool.
    pub workers: usize,
}

/// Certificate chain and private key (PEM) for client-facing TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}

/// `[ims]`.
#[derive(Debug, Clone)]
pub struct ImsConfig {
    /// Default token endpoint.
    pub token_url: String,
    /// Refresh when less than this is left (capped at half the lifetime).
    pub refresh_margin: Duration,
    /// Limit on one token request, and on how long a request waits for a first token.
    pub request_timeout: Duration,
}

/// `[outbound]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundConfig {
    /// Extra trusted roots (PEM).
    pub ca_file: Option<PathBuf>,
    /// Explicit egress proxy; `None` means the environment's HTTPS_PROXY/HTTP_PROXY/NO_PROXY.
    pub proxy: Option<String>,
    /// Pooled upstream connections idle limit.
    pub pool_idle_timeout: Duration,
}

/// One technical account (`[credentials.NAME]`).
#[derive(Debug, Clone)]
pub struct CredentialConfig {
    /// The table name.
    pub name: String,
    /// OAuth client id, also sent as `x-api-key`.
    pub client_id: String,
    /// One or two client secrets, tried in order.
    pub secrets: Vec<Secret>,
    /// OAuth scopes (joined by commas in the token request).
    pub scopes: Vec<String>,
    /// Sent as `x-gw-ims-org-id` when set.
    pub org_id: Option<String>,
    /// Token endpoint for this credential.
    pub token_url: String,
    /// Cap on concurrent upstream requests using this credential.
    pub max_in_flight: Option<u32>,
    /// How long a request may wait for a slot under `max_in_flight`.
    pub queue_timeout: Duration,
    /// After an upstream 429 with Retry-After, answer 429 locally until it passes.
    pub respect_retry_after: bool,
}

impl CredentialConfig {
    /// True when a token fetched for `other` is also a token for `self`.
    pub fn same_identity(&self, other: &CredentialConfig) -> bool {
        self.client_id == other.client_id
            && self.secrets == other.secrets
            && self.scopes == other.scopes
            && self.token_url == other.token_url
    }
}

/// One route (`[[routes]]`).
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Route name, used in metrics and logs.
    pub name: String,
    /// Path prefix, no trailing slash except for `/` itself.
    pub prefix: String,
    /// Upstream scheme (`http` or `https`).
    pub upstream_scheme: http::uri::Scheme,
    /// Upstream authority (host and port).
    pub upstream_authority: http::uri::Authority,
    /// Upstream base path, no trailing slash (empty for none).
    pub upstream_base_path: String,
    /// The upstream as written (for `check`).
    pub upstream: String,
    /// Credential name.
    pub credential: String,
    /// Remove the prefix before forwarding.
    pub strip_prefix: bool,
    /// Send `x-api-key: <client_id>`.
    pub send_api_key: bool,
    /// Limit until the upstream's response head.
    pub upstream_timeout: Duration,
    /// Pass `Cookie` and `Set-Cookie`.
    pub pass_cookies: bool,
    /// Static headers set on every request, replacing the client's.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// Whether clients need a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    /// Every request needs a configured key.
    Keys,
    /// No key needed; clients show up as `anonymous`.
    Open,
}

/// `[access]`.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    /// Keys or open.
    pub mode: AccessMode,
    /// Allows open mode on a non-loopback listen address.
    pub allow_open_on_network: bool,
    /// Source-address allow list (empty: everyone).
    pub allow_cidrs: Vec<IpNet>,
    /// Client keys.
    pub keys: Vec<KeyConfig>,
}

/// One client key (`[[access.keys]]`).
#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// Client name in logs and metrics.
    pub name: String,
    /// SHA-256 of the key.
    pub sha256: [u8; 32],
    /// Route names this key may use (`None`: every route).
    pub routes: Option<Vec<String>>,
    /// Token bucket refill rate and size.
    pub rate: Option<RateLimit>,
    /// Refused as if unknown.
    pub disabled: bool,
}

/// A token bucket: `per_second` refill, `burst` capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size.
    pub burst: u32,
}

impl Config {
    /// Reads, expands and validates a config file against the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, &ProcessEnv)
    }

    /// Like [`Config::load`], with `${VAR}` values taken from `env`.
    pub fn load_with_env(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            ..ConfigError::new("", format!("cannot read: {e}"))
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::parse(&text, base, env).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            ..e
        })
    }

    /// Parses TOML text; relative file paths (secret files, TLS, CA) are relative to `base_dir`.
    pub fn parse(text: &str, base_dir: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            // Syntax errors (duplicate keys, bad quoting) have no path: the line names them.
            let key = match (key.as_str(), line) {
                (".", Some(_)) => String::new(),
                (".", None) => "config".to_string(),
                _ => key,
            };
            let line = line.or_else(|| locate::line_of(text, &key));
            ConfigError {
                line,
                ..ConfigError::new(key, hide_values(inner.message().trim()).replace('\n', " "))
            }
        })?;
        Validator { base_dir, env }
            .validate(raw)
            .map_err(|e| ConfigError {
                line: locate::line_of(text, &e.key),
                ..e
            })
    }
}

struct Validator<'a> {
    base_dir: &'a Path,
    env: &'a dyn Env,
}

fn duration(key: &str, value: Option<&String>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(s) => {
            let d = humantime::parse_duration(s.trim()).map_err(|e| {
                ConfigError::new(
                    key,
                    format!("invalid duration {s:?} ({e}); use e.g. \"250ms\", \"10s\", \"1h\""),
                )
            })?;
            if d.is_zero() {
                return Err(ConfigError::new(key, "must be greater than zero"));
            }
            Ok(d)
        }
    }
}

fn socket_addr(
    key: &str,
    value: Option<&String>,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    let s = value.map(String::as_str).unwrap_or(default);
    s.parse().map_err(|_| {
        ConfigError::new(
            key,
            format!("{s:?} is not an IP:port address (e.g. \"127.0.0.1:8080\")"),
        )
    })
}

/// Names a route's static header may not use: they are the proxy's own to set.
const RESERVED_ROUTE_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "x-proxy-key",
];

impl Validator<'_> {
    fn expand(&self, key: &str, value: &str) -> Result<String, ConfigError> {
        expand(value, self.env).map_err(|m| ConfigError::new(key, m))
    }

    fn path(&self, value: &str) -> PathBuf {
        let p = PathBuf::from(value);
        if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = self.server(&raw.server)?;
        let ims = self.ims(&raw.ims)?;
        let outbound = self.outbound(&raw.outbound)?;
        let mut credentials = BTreeMap::new();
        for (name, c) in &raw.credentials {
            credentials.insert(name.clone(), self.credential(name, c, &ims)?);
        }
        let mut routes = Vec::new();
        let mut names = HashSet::new();
        let mut prefixes = HashSet::new();
        for (i, r) in raw.routes.iter().enumerate() {
            let route = self.route(i, r, &credentials)?;
            if !names.insert(route.name.clone()) {
                return Err(ConfigError::new(
                    format!("routes[{i}].name"),
                    format!("duplicate route name {:?}", route.name),
                ));
            }
            if !prefixes.insert(route.prefix.clone()) {
                return Err(ConfigError::new(
                    format!("routes[{i}].prefix"),
                    format!("prefix {:?} is already used by another route", route.prefix),
                ));
            }
            routes.push(route);
        }
        if routes.is_empty() {
            return Err(ConfigError::new(
                "routes",
                "at least one [[routes]] entry is required",
            ));
        }
        let access = self.access(&raw.access, &names, &server)?;
        Ok(Config {
            server,
            ims,
            outbound,
            credentials,
            routes,
            access,
        })
    }

    fn server(&self, s: &raw::RawServer) -> Result<ServerConfig, ConfigError> {
        let tls = match (&s.tls_cert_file, &s.tls_key_file) {
            (None, None) => None,
            (Some(c), Some(k)) => Some(TlsFiles {
                cert_file: self.path(c),
                key_file: self.path(k),
            }),
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "server.tls_key_file",
                    "must be set when server.tls_cert_file is",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "server.tls_cert_file",
                    "must be set when server.tls_key_file is",
                ))
            }
        };
        let max = s.max_scrub_body_bytes.unwrap_or(1024 * 1024);
        if max == 0 {
            return Err(ConfigError::new(
                "server.max_scrub_body_bytes",
                "must be greater than zero",
            ));
        }
        let workers = match s.workers {
            None => crate::workers::default_count(),
            Some(n @ 1..=MAX_WORKERS) => n as usize,
            Some(_) => {
                return Err(ConfigError::new(
                    "server.workers",
                    format!("must be between 1 and {MAX_WORKERS} (default: one per CPU)"),
                ))
            }
        };
        Ok(ServerConfig {
            listen: socket_addr("server.listen", s.listen.as_ref(), "127.0.0.1:8080")?,
            admin_listen: socket_addr(
                "server.admin_listen",
                s.admin_listen.as_ref(),
                "127.0.0.1:9464",
            )?,
            tls,
            header_read_timeout: duration(
                "server.header_read_timeout",
                s.header_read_timeout.as_ref(),
                Duration::from_secs(10),
            )?,
            idle_timeout: duration(
                "server.idle_timeout",
                s.idle_timeout.as_ref(),
                Duration::from_secs(90),
            )?,
            shutdown_grace: duration(
                "server.shutdown_grace",
                s.shutdown_grace.as_ref(),
                Duration::from_secs(30),
            )?,
            max_scrub_body_bytes: max,
            audit_log: s.audit_log.as_ref().map(|p| self.path(p)),
            workers,
        })
    }

    fn ims(&self, s: &raw::RawIms) -> Result<ImsConfig, ConfigError> {
        let token_url = match &s.token_url {
            Some(u) => self.url("ims.token_url", u, false)?,
            None => DEFAULT_TOKEN_URL.to_string(),
        };
        Ok(ImsConfig {
            token_url,
            refresh_margin: duration(
                "ims.refresh_margin",
                s.refresh_margin.as_ref(),
                Duration::from_secs(3600),
            )?,
            request_timeout: duration(
                "ims.request_timeout",
                s.request_timeout.as_ref(),
                Duration::from_secs(10),
            )?,
        })
    }

    fn outbound(&self, s: &raw::RawOutbound) -> Result<OutboundConfig, ConfigError> {
        let proxy = match &s.proxy {
            Some(p) => Some(self.url("outbound.proxy", p, true)?),
            None => None,
        };
        let ca_file = s.ca_file.as_ref().map(|p| self.path(p));
        if let Some(ca) = &ca_file {
            if !ca.is_file() {
                return Err(ConfigError::new(
                    "outbound.ca_file",
                    format!("{} is not a readable file", ca.display()),
                ));
            }
        }
        Ok(OutboundConfig {
            ca_file,
            proxy,
            pool_idle_timeout: duration(
                "outbound.pool_idle_timeout",
                s.pool_idle_timeout.as_ref(),
                Duration::from_secs(90),
            )?,
        })
    }

    /// An http(s) URL. Errors quote the value as written (before `${VAR}`
    /// expansion), so an expanded secret never reaches `check` or the logs.
    fn url(&self, key: &str, written: &str, allow_userinfo: bool) -> Result<String, ConfigError> {
        let value = self.expand(key, written)?;
        let uri: Uri = value
            .parse()
            .map_err(|_| ConfigError::new(key, format!("{written:?} is not a URL")))?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) {
            return Err(ConfigError::new(
                key,
                format!("{written:?} must start with http:// or https://"),
            ));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(ConfigError::new(key, format!("{written:?} has no host")));
        }
        if !allow_userinfo && uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(ConfigError::new(
                key,
                "must not carry user:password (it would be sent as the Host)",
            ));
        }
        Ok(value)
    }

    fn credential(
        &self,
        name: &str,
        c: &raw::RawCredential,
        ims: &ImsConfig,
    ) -> Result<CredentialConfig, ConfigError> {
        let key = |field: &str| format!("credentials.{name}.{field}");
        let client_id = match &c.client_id {
            Some(id) => self.expand(&key("client_id"), id)?.trim().to_string(),
            None => return Err(ConfigError::new(key("client_id"), "is required")),
        };
        if client_id.is_empty() {
            return Err(ConfigError::new(key("client_id"), "must not be empty"));
        }
        let set = [
            c.client_secret.is_some(),
            c.client_secret_file.is_some(),
            c.client_secrets.is_some(),
        ];
        let secrets = match set.iter().filter(|b| **b).count() {
            0 => {
                return Err(ConfigError::new(
                    key("client_secret"),
                    "is required (or client_secret_file, or client_secrets)",
                ))
            }
            1 => {
                if let Some(s) = &c.client_secret {
                    vec![Secret::new(self.expand(&key("client_secret"), s)?)]
                } else if let Some(file) = &c.client_secret_file {
                    let path = self.path(&self.expand(&key("client_secret_file"), file)?);
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        ConfigError::new(
                            key("client_secret_file"),
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?;
                    vec![Secret::new(text.trim_end_matches(['\r', '\n']))]
                } else {
                    let list = c.client_secrets.as_deref().unwrap_or_default();
                    let mut out = Vec::new();
                    for (i, s) in list.iter().enumerate() {
                        out.push(Secret::new(
                            self.expand(&format!("{}[{i}]", key("client_secrets")), s)?,
                        ));
                    }
                    if out.is_empty() || out.len() > 2 {
                        return Err(ConfigError::new(
                            key("client_secrets"),
                            "must list one or two secrets (IMS holds at most two at once)",
                        ));
                    }
                    out
                }
            }
            _ => {
                return Err(ConfigError::new(
                    key("client_secret"),
                    "set only one of client_secret, client_secret_file, client_secrets",
                ))
            }
        };
        if secrets.iter().any(Secret::is_empty) {
            return Err(ConfigError::new(key("client_secret"), "must not be empty"));
        }
        let scopes: Vec<String> = match &c.scopes {
            Some(s) => s
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            None => Vec::new(),
        };
        if scopes.is_empty() {
            return Err(ConfigError::new(key("scopes"), "must list at least one scope (see the credential's page in Adobe Developer Console)"));
        }
        if let Some(bad) = scopes.iter().find(|s| s.contains(',')) {
            return Err(ConfigError::new(
                key("scopes"),
                format!("{bad:?}: list each scope as its own string"),
            ));
        }
        let org_id = match &c.org_id {
            Some(o) => {
                let o = self.expand(&key("org_id"), o)?;
                HeaderValue::from_str(&o)
                    .map_err(|_| ConfigError::new(key("org_id"), "is not a valid header value"))?;
                Some(o)
            }
            None => None,
        };
        if c.max_in_flight == Some(0) {
            return Err(ConfigError::new(key("max_in_flight"), "must be at least 1"));
        }
        Ok(CredentialConfig {
            name: name.to_string(),
            client_id,
            secrets,
            scopes,
            org_id,
            token_url: match &c.token_url {
                Some(u) => self.url(&key("token_url"), u, false)?,
                None => ims.token_url.clone(),
            },
            max_in_flight: c.max_in_flight,
            queue_timeout: duration(
                &key("queue_timeout"),
                c.queue_timeout.as_ref(),
                Duration::from_secs(30),
            )?,
            respect_retry_after: c.respect_retry_after.unwrap_or(false),
        })
    }

    fn route(
        &self,
        i: usize,
        r: &raw::RawRoute,
        credentials: &BTreeMap<String, CredentialConfig>,
    ) -> Result<RouteConfig, ConfigError> {
        let key = |field: &str| format!("routes[{i}].{field}");
        let name = r
            .name
            .clone()
            .ok_or_else(|| ConfigError::new(key("name"), "is required"))?;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError::new(
                key("name"),
                format!("{name:?}: use letters, digits, '-', '_' or '.'"),
            ));
        }
        let prefix = r
            .prefix
            .clone()
            .ok_or_else(|| ConfigError::new(key("prefix"), "is required"))?;
        let prefix = normalize_prefix(&prefix).map_err(|m| ConfigError::new(key("prefix"), m))?;
        let upstream = r
            .upstream
            .as_ref()
            .ok_or_else(|| ConfigError::new(key("upstream"), "is required"))?;
        let upstream = self.url(&key("upstream"), upstream, false)?;
        let uri: Uri = upstream
            .parse()
            .map_err(|_| ConfigError::new(key("upstream"), "is not a URL"))?;
        if uri.query().is_some() {
            return Err(ConfigError::new(
                key("upstream"),
                "must not have a query string",
            ));
        }
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
        else {
            return Err(ConfigError::new(
                key("upstream"),
                "must be an absolute http(s) URL",
            ));
        };
        let credential = r
            .credential
            .clone()
            .ok_or_else(|| ConfigError::new(key("credential"), "is required"))?;
        if !credentials.contains_key(&credential) {
            let known: Vec<&str> = credentials.keys().map(String::as_str).collect();
            return Err(ConfigError::new(
                key("credential"),
                format!("no credential named {credential:?} (known: {known:?})"),
            ));
        }
        let mut headers = Vec::new();
        for (hname, hvalue) in &r.headers {
            let hkey = format!("routes[{i}].headers.{hname}");
            let n = HeaderName::from_bytes(hname.as_bytes())
                .map_err(|_| ConfigError::new(&hkey, "is not a valid header name"))?;
            if RESERVED_ROUTE_HEADERS.contains(&n.as_str()) {
                return Err(ConfigError::new(
                    &hkey,
                    "is set by the proxy itself and cannot be configured",
                ));
            }
            let v = self.expand(&hkey, hvalue)?;
            let v = HeaderValue::from_str(&v)
                .map_err(|_| ConfigError::new(&hkey, "is not a valid header value"))?;
            headers.push((n, v));
        }
        Ok(RouteConfig {
            name,
            prefix,
            upstream_scheme: scheme,
            upstream_authority: authority,
            upstream_base_path: uri.path().trim_end_matches('/').to_string(),
            upstream,
            credential,
            strip_prefix: r.strip_prefix.unwrap_or(true),
            send_api_key: r.send_api_key.unwrap_or(true),
            upstream_timeout: duration(
                &key("upstream_timeout"),
                r.upstream_timeout.as_ref(),
                Duration::from_secs(120),
            )?,
            pass_cookies: r.pass_cookies.unwrap_or(false),
            headers,
        })
    }

    fn access(
        &self,
        a: &raw::RawAccess,
        routes: &HashSet<String>,
        server: &ServerConfig,
    ) -> Result<AccessConfig, ConfigError> {
        let mode = match a.mode.as_deref() {
            None | Some("keys") => AccessMode::Keys,
            Some("open") => AccessMode::Open,
            Some(other) => {
                return Err(ConfigError::new(
                    "access.mode",
                    format!("{other:?}: use \"keys\" or \"open\""),
                ))
            }
        };
        let allow_open_on_network = a.allow_open_on_network.unwrap_or(false);
        if mode == AccessMode::Open && !server.listen.ip().is_loopback() && !allow_open_on_network {
            return Err(ConfigError::new(
                "access.mode",
                format!("\"open\" on non-loopback address {} lets anyone who reaches it act as the technical account; set access.allow_open_on_network = true if that is intended", server.listen),
            ));
        }
        let mut allow_cidrs = Vec::new();
        for (i, c) in a.allow_cidrs.iter().flatten().enumerate() {
            let net = c
                .parse::<IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    ConfigError::new(
                        format!("access.allow_cidrs[{i}]"),
                        format!("{c:?} is not a CIDR (e.g. \"10.0.0.0/8\") or IP address"),
                    )
                })?;
            allow_cidrs.push(net);
        }
        let mut keys = Vec::new();
        let mut names = HashSet::new();
        for (i, k) in a.keys.iter().enumerate() {
            let key = |field: &str| format!("access.keys[{i}].{field}");
            let name = k
                .name
                .clone()
                .ok_or_else(|| ConfigError::new(key("name"), "is required"))?;
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
            {
                return Err(ConfigError::new(
                    key("name"),
                    format!("{name:?}: use letters, digits, '-', '_', '.' or '@'"),
                ));
            }
            if name == "anonymous" || name == "none" {
                return Err(ConfigError::new(
                    key("name"),
                    format!("{name:?} is reserved for metrics"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("duplicate key name {name:?}"),
                ));
            }
            let hexed = k.sha256.as_deref().ok_or_else(|| {
                ConfigError::new(
                    key("sha256"),
                    "is required (make one with `ims-proxy hash-key`)",
                )
            })?;
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(hexed.trim(), &mut sha256).map_err(|_| {
                ConfigError::new(
                    key("sha256"),
                    "must be 64 hex characters (the output of `ims-proxy hash-key`)",
                )
            })?;
            if let Some(rs) = &k.routes {
                for (j, r) in rs.iter().enumerate() {
                    if !routes.contains(r) {
                        return Err(ConfigError::new(
                            format!("access.keys[{i}].routes[{j}]"),
                            format!("no route named {r:?}"),
                        ));
                    }
                }
            }
            let rate = match (k.rate_per_second, k.burst) {
                (None, None) => None,
                (None, Some(_)) => {
                    return Err(ConfigError::new(
                        key("rate_per_second"),
                        "must be set when burst is",
                    ))
                }
                (Some(r), burst) => {
                    if !(r.is_finite() && r >= 0.001) {
                        return Err(ConfigError::new(
                            key("rate_per_second"),
                            "must be a number of at least 0.001 (one request per 1000 s)",
                        ));
                    }
                    let burst = burst.unwrap_or_else(|| r.ceil().max(1.0) as u32);
                    if burst == 0 {
                        return Err(ConfigError::new(key("burst"), "must be at least 1"));
                    }
                    Some(RateLimit {
                        per_second: r,
                        burst,
                    })
                }
            };
            keys.push(KeyConfig {
                name,
                sha256,
                routes: k.routes.clone(),
                rate,
                disabled: k.disabled.unwrap_or(false),
            });
        }
        if mode == AccessMode::Keys && keys.is_empty() {
            return Err(ConfigError::new(
                "access.keys",
                "mode = \"keys\" needs at least one [[access.keys]] entry (or mode = \"open\")",
            ));
        }
        Ok(AccessConfig {
            mode,
            allow_open_on_network,
            allow_cidrs,
            keys,
        })
    }
}

/// Replaces every double-quoted value in a parser message with `"…"`: a secret
/// written where a list was expected must not be echoed back.
fn hide_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let (mut quoted, mut escaped) = (false, false);
    for c in message.chars() {
        if quoted {
            // Inside a quoted value: drop everything, honouring `\"` escapes.
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    out.push('"');
                    quoted = false;
                }
                _ => {}
            }
        } else if c == '"' {
            out.push_str("\"…");
            quoted = true;
        } else {
            out.push(c);
        }
    }
    out
}

/// Canonical prefix: starts with `/`, no trailing `/` (except `/`), no dot segments, no query.
fn normalize_prefix(p: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err(format!("{p:?} must start with '/'"));
    }
    if p.contains(['?', '#', '%']) || p.contains("//") {
        return Err(format!(
            "{p:?} must be a plain path (no '?', '#', '%' or '//')"
        ));
    }
    if p.split('/').any(|s| s == "." || s == "..") {
        return Err(format!("{p:?} must not contain dot segments"));
    }
    let t = p.trim_end_matches('/');
    Ok(if t.is_empty() {
        "/".to_string()
    } else {
        t.to_string()
    })
}

#[cfg(test)]
mod tests;
