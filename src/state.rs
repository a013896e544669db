//! The runtime snapshot: routes, keys and token managers, built from one
//! configuration and swapped whole on reload, so a request sees one
//! consistent configuration from start to end.

use crate::access::Access;
use crate::audit::AuditLog;
use crate::config::{Config, CredentialConfig};
use crate::ims::ImsClient;
use crate::metrics::{ChargebackTable, Metrics};
use crate::route::Router;
use crate::slots::Slots;
use crate::token::{ImsSource, Timing, TokenManager, TokenReport};
use crate::upstream::{self, UpstreamClient};
use arc_swap::ArcSwap;
use http::HeaderValue;
use prometheus::IntGauge;
use rustc_hash::FxHashMap;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// One credential at run time.
pub struct CredentialRuntime {
    /// The validated credential.
    pub config: CredentialConfig,
    /// Its token manager (shared across snapshots while its identity is unchanged).
    pub manager: Arc<TokenManager>,
    /// `x-api-key` value (the client id).
    pub api_key: HeaderValue,
    /// `x-gw-ims-org-id` value.
    pub org_id: Option<HeaderValue>,
    /// `max_in_flight` slots.
    pub slots: Option<Arc<Slots>>,
    /// `ims_proxy_queued_requests{credential}`.
    pub queued: IntGauge,
    /// With `respect_retry_after`: no request upstream before this.
    pub hold_until: Arc<Mutex<Option<Instant>>>,
}

/// Everything a request reads, from one configuration.
pub struct Snapshot {
    /// The configuration it was built from.
    pub config: Arc<Config>,
    /// Routes.
    pub router: Router,
    /// Client access rules.
    pub access: Access,
    /// Credentials by name.
    pub credentials: FxHashMap<String, Arc<CredentialRuntime>>,
    /// Chargeback counters (bytes, upstream 429s) per route and client, resolved once per snapshot.
    pub chargeback: ChargebackTable,
    /// Pooled upstream client.
    pub upstream: UpstreamClient,
    /// The IMS client every token manager of this snapshot fetches through.
    pub ims: Arc<ArcSwap<ImsClient>>,
}

/// State shared by every connection: the swapped snapshot and the metrics.
pub struct Shared {
    /// The current snapshot; replaced whole by reloads (the only writer).
    pub snapshot: ArcSwap<Snapshot>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// The audit log, when `server.audit_log` is set.
    pub audit: Option<AuditLog>,
    /// The client-facing certificate, when the proxy serves TLS (set once by the server).
    pub tls: std::sync::OnceLock<Arc<crate::server::TlsCert>>,
    config_path: Option<PathBuf>,
    reload_lock: tokio::sync::Mutex<()>,
}

/// The outcome of a reload, as `/reload` answers it.
#[derive(Debug, Serialize)]
pub struct ReloadReport {
    /// `ok` or `error`.
    pub result: &'static str,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Credentials that kept their token.
    pub kept: Vec<String>,
    /// Credentials with a new token.
    pub renewed: Vec<String>,
    /// Credentials no longer configured.
    pub removed: Vec<String>,
    /// Things that could not change.
    pub warnings: Vec<String>,
}

impl ReloadReport {
    fn failed(error: String) -> Self {
        ReloadReport {
            result: "error",
            error: Some(error),
            kept: vec![],
            renewed: vec![],
            removed: vec![],
            warnings: vec![],
        }
    }
}

fn timing(config: &Config) -> Timing {
    Timing {
        refresh_margin: config.ims.refresh_margin,
        request_timeout: config.ims.request_timeout,
    }
}

impl Shared {
    /// Builds the first snapshot and starts every credential's token fetch at once.
    pub fn start(
        config: Config,
        config_path: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Shared>, String> {
        let ims = Arc::new(ArcSwap::from_pointee(ImsClient::new(
            &config.outbound,
            config.ims.request_timeout,
        )?));
        let upstream = upstream::build(&config.outbound, config.server.workers)?;
        let managers = config
            .credentials
            .iter()
            .map(|(name, c)| (name.clone(), start_manager(c, &ims, &config, &metrics)))
            .collect();
        let audit = match &config.server.audit_log {
            Some(path) => Some(
                AuditLog::open(path)
                    .map_err(|e| format!("server.audit_log: {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let snapshot = build_snapshot(config, &metrics, managers, None, upstream, ims)?;
        Ok(Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            audit,
            config_path,
            reload_lock: tokio::sync::Mutex::new(()),
            tls: std::sync::OnceLock::new(),
        }))
    }

    /// Re-reads the config file and applies it (SIGHUP, `POST /reload`).
    pub async fn reload(&self) -> ReloadReport {
        // logrotate's postrotate sends SIGHUP: reopen even if the config turns out invalid.
        if let Some(audit) = &self.audit {
            audit.reopen();
        }
        let Some(path) = self.config_path.clone() else {
            return self.record(ReloadReport::failed("no config file to reload".into()));
        };
        match Config::load(&path) {
            Ok(c) => self.apply(c).await,
            Err(e) => self.record(ReloadReport::failed(e.to_string())),
        }
    }

    fn record(&self, report: ReloadReport) -> ReloadReport {
        self.metrics
            .config_reloads
            .with_label_values(&[report.result])
            .inc();
        match &report.error {
            None => {
                tracing::info!(kept = ?report.kept, renewed = ?report.renewed, removed = ?report.removed, "configuration reloaded")
            }
            Some(e) => {
                tracing::error!(error = %e, "reload refused; the running configuration stays in place")
            }
        }
        for w in &report.warnings {
            tracing::warn!("{w}");
        }
        report
    }

    /// A refused reload: the running snapshot stays, candidate managers are retired (no
    /// more metric writes; their tasks end when the caller drops them), series they
    /// created for names the running config lacks go, and the running tokens' expiry is
    /// published again (candidates may have overwritten it).
    fn refuse(
        &self,
        old: &Snapshot,
        error: String,
        candidates: &[Arc<TokenManager>],
    ) -> ReloadReport {
        for m in candidates {
            m.retire();
            if !old.credentials.contains_key(m.name()) {
                self.metrics.forget_credential(m.name());
            }
        }
        for c in old.credentials.values() {
            c.manager.publish_expiry();
        }
        self.record(ReloadReport::failed(error))
    }

    /// Applies a new configuration: unchanged credentials keep their token, changed
    /// ones must get a token first, or nothing changes.
    pub async fn apply(&self, config: Config) -> ReloadReport {
        let _one_writer = self.reload_lock.lock().await;
        let old = self.snapshot.load_full();
        let mut warnings = Vec::new();
        if config.server.listen != old.config.server.listen
            || config.server.admin_listen != old.config.server.admin_listen
        {
            warnings
                .push("listen addresses cannot change on reload; restart to move them".to_string());
        }
        let (new_server, old_server) = (&config.server, &old.config.server);
        if (
            new_server.header_read_timeout,
            new_server.idle_timeout,
            new_server.shutdown_grace,
        ) != (
            old_server.header_read_timeout,
            old_server.idle_timeout,
            old_server.shutdown_grace,
        ) {
            warnings.push("server.header_read_timeout, idle_timeout and shutdown_grace take effect on restart".to_string());
        }
        if config.server.workers != old.config.server.workers {
            warnings.push("server.workers changed; it takes effect on restart".to_string());
        }
        if config.server.audit_log != old.config.server.audit_log {
            warnings.push("server.audit_log changed; it takes effect on restart".to_string());
        }
        // The certificate files are re-read on every reload (renewals keep their paths);
        // an unusable pair refuses the reload and the running certificate stays.
        let new_cert = match (self.tls.get(), &config.server.tls) {
            (Some(_), Some(files)) => match crate::server::load_certified_key(files) {
                Ok(k) => Some(k),
                Err(e) => return self.refuse(&old, e, &[]),
            },
            _ => None,
        };
        if config.server.tls.is_some() != old.config.server.tls.is_some() {
            warnings
                .push("turning client-facing TLS on or off takes effect on restart".to_string());
        }
        // A new egress path (proxy, CA) must prove itself: every credential then
        // fetches a token through it before the new configuration is used.
        let same_egress = config.outbound.proxy == old.config.outbound.proxy
            && config.outbound.ca_file == old.config.outbound.ca_file;
        let new_client =
            if same_egress && config.ims.request_timeout == old.config.ims.request_timeout {
                None
            } else {
                match ImsClient::new(&config.outbound, config.ims.request_timeout) {
                    Ok(c) => Some(c),
                    Err(e) => return self.refuse(&old, e, &[]),
                }
            };
        // Kept managers share the old cell (it gets the new client once the reload is
        // in); a new egress path gets a cell of its own, used only by new managers.
        let ims = match (&new_client, same_egress) {
            (Some(c), false) => Arc::new(ArcSwap::from_pointee(c.clone())),
            _ => old.ims.clone(),
        };
        let upstream = if config.outbound == old.config.outbound {
            old.upstream.clone()
        } else {
            // The worker count is fixed until restart: one pool for each running worker.
            match upstream::build(&config.outbound, old.upstream.pools()) {
                Ok(c) => c,
                Err(e) => return self.refuse(&old, e, &[]),
            }
        };
        let (mut kept, mut renewed, mut managers, mut fresh) =
            (vec![], vec![], HashMap::new(), vec![]);
        for (name, c) in &config.credentials {
            match old
                .credentials
                .get(name)
                .filter(|o| same_egress && o.config.same_identity(c))
            {
                Some(o) => {
                    kept.push(name.clone());
                    managers.insert(name.clone(), o.manager.clone());
                }
                None => {
                    let m = start_manager(c, &ims, &config, &self.metrics);
                    renewed.push(name.clone());
                    fresh.push(m.clone());
                    managers.insert(name.clone(), m);
                }
            }
        }
        // Changed credentials must hold a token before the new configuration serves anything.
        let results = futures_util::future::join_all(
            fresh
                .iter()
                .map(|m| async move { (m.name().to_string(), m.token().await) }),
        )
        .await;
        for (name, r) in results {
            if r.is_err() {
                let why = managers
                    .get(&name)
                    .and_then(|m| m.report().last_error)
                    .unwrap_or_else(|| "timed out".into());
                return self.refuse(
                    &old,
                    format!("credentials.{name}: cannot get a token: {why}"),
                    &fresh,
                );
            }
        }
        let removed: Vec<String> = old
            .credentials
            .keys()
            .filter(|n| !config.credentials.contains_key(*n))
            .cloned()
            .collect();
        let new_timing = timing(&config);
        match build_snapshot(config, &self.metrics, managers, Some(&old), upstream, ims) {
            Ok(s) => {
                for name in &kept {
                    if let Some(c) = s.credentials.get(name) {
                        c.manager.set_timing(new_timing);
                    }
                }
                if let (Some(client), true) = (new_client, same_egress) {
                    s.ims.store(Arc::new(client));
                }
                self.snapshot.store(Arc::new(s));
                if let (Some(tls), Some(cert)) = (self.tls.get(), new_cert) {
                    tls.store(cert);
                }
                // Replaced managers may live on in requests still holding the old snapshot;
                // retired, they no longer refresh or write their credential's series.
                for name in renewed.iter().chain(&removed) {
                    if let Some(c) = old.credentials.get(name) {
                        c.manager.retire();
                    }
                }
                for name in &removed {
                    self.metrics.forget_credential(name);
                }
                self.record(ReloadReport {
                    result: "ok",
                    error: None,
                    kept,
                    renewed,
                    removed,
                    warnings,
                })
            }
            Err(e) => self.refuse(&old, e, &fresh),
        }
    }

    /// Every credential's token state, by name; never the token.
    pub fn token_reports(&self) -> Vec<TokenReport> {
        let mut reports: Vec<_> = self
            .snapshot
            .load()
            .credentials
            .values()
            .map(|c| c.manager.report())
            .collect();
        reports.sort_by(|a, b| a.credential.cmp(&b.credential));
        reports
    }

    /// True when every credential holds a token it is not about to lose.
    pub fn ready(&self) -> bool {
        self.token_reports().iter().all(|r| r.ready)
    }
}

/// Starts a credential's token manager, fetching through the snapshot's IMS client cell.
fn start_manager(
    credential: &CredentialConfig,
    ims: &Arc<ArcSwap<ImsClient>>,
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Arc<TokenManager> {
    let source = Box::new(ImsSource {
        client: ims.clone(),
        credential: credential.clone(),
    });
    TokenManager::start(&credential.name, source, timing(config), metrics.clone())
}

fn build_snapshot(
    config: Config,
    metrics: &Metrics,
    managers: HashMap<String, Arc<TokenManager>>,
    previous: Option<&Snapshot>,
    upstream: UpstreamClient,
    ims: Arc<ArcSwap<ImsClient>>,
) -> Result<Snapshot, String> {
    let router = Router::new(&config.routes, metrics)?;
    // Chargeback series start at zero for every client that may use a route.
    let clients: Vec<(&str, Option<&Vec<String>>)> = match config.access.mode {
        crate::config::AccessMode::Open => vec![("anonymous", None)],
        crate::config::AccessMode::Keys => config
            .access
            .keys
            .iter()
            .map(|k| (k.name.as_str(), k.routes.as_ref()))
            .collect(),
    };
    let mut chargeback = ChargebackTable::default();
    for r in &config.routes {
        for (client, allowed) in &clients {
            if allowed.is_none_or(|a| a.contains(&r.name)) {
                chargeback.register(metrics, &r.name, client);
            }
        }
    }
    let access = Access::new(&config.access, previous.map(|p| &p.access));
    let mut credentials = FxHashMap::default();
    let by_name: BTreeMap<_, _> = config.credentials.iter().collect();
    for (name, c) in by_name {
        let manager = managers
            .get(name)
            .cloned()
            .ok_or_else(|| format!("credential {name} has no token manager"))?;
        let prev = previous.and_then(|p| p.credentials.get(name));
        let slots = match (c.max_in_flight, prev) {
            (Some(n), Some(p)) if p.config.max_in_flight == Some(n) => p.slots.clone(),
            (Some(n), _) => Some(Slots::new(n as usize)),
            (None, _) => None,
        };
        let api_key = HeaderValue::from_str(&c.client_id)
            .map_err(|_| format!("credentials.{name}.client_id: not a valid header value"))?;
        let org_id = match &c.org_id {
            Some(o) => Some(
                HeaderValue::from_str(o)
                    .map_err(|_| format!("credentials.{name}.org_id: not a valid header value"))?,
            ),
            None => None,
        };
        credentials.insert(
            name.clone(),
            Arc::new(CredentialRuntime {
                config: c.clone(),
                manager,
                api_key,
                org_id,
                slots,
                queued: metrics.queued.with_label_values(&[name]),
                hold_until: prev.map(|p| p.hold_until.clone()).unwrap_or_default(),
            }),
        );
    }
    Ok(Snapshot {
        config: Arc::new(config),
        router,
        access,
        credentials,
        chargeback,
        upstream,
        ims,
    })
}
