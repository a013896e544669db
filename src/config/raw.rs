//! The configuration file exactly as written: serde structs that refuse unknown keys.

use serde::Deserialize;
use std::collections::BTreeMap;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub ims: RawIms,
    #[serde(default)]
    pub outbound: RawOutbound,
    #[serde(default)]
    pub credentials: BTreeMap<String, RawCredential>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub access: RawAccess,
}

/// `[server]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub shutdown_grace: Option<String>,
    pub max_scrub_body_bytes: Option<u64>,
    pub audit_log: Option<String>,
    pub workers: Option<u64>,
}

/// `[ims]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIms {
    pub token_url: Option<String>,
    pub refresh_margin: Option<String>,
    pub request_timeout: Option<String>,
}

/// `[outbound]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutbound {
    pub ca_file: Option<String>,
    pub proxy: Option<String>,
    pub pool_idle_timeout: Option<String>,
}

/// `[credentials.NAME]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<String>,
    pub client_secrets: Option<Vec<String>>,
    pub scopes: Option<Vec<String>>,
    pub org_id: Option<String>,
    pub token_url: Option<String>,
    pub max_in_flight: Option<u32>,
    pub queue_timeout: Option<String>,
    pub respect_retry_after: Option<bool>,
}

/// `[[routes]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<String>,
    pub prefix: Option<String>,
    pub upstream: Option<String>,
    pub credential: Option<String>,
    pub strip_prefix: Option<bool>,
    pub send_api_key: Option<bool>,
    pub upstream_timeout: Option<String>,
    pub pass_cookies: Option<bool>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// `[access]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    pub mode: Option<String>,
    pub allow_open_on_network: Option<bool>,
    pub allow_cidrs: Option<Vec<String>>,
    #[serde(default)]
    pub keys: Vec<RawKey>,
}

/// `[[access.keys]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub name: Option<String>,
    pub sha256: Option<String>,
    pub routes: Option<Vec<String>>,
    pub rate_per_second: Option<f64>,
    pub burst: Option<u32>,
    pub disabled: Option<bool>,
}
