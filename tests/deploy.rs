//! The operators' kit, checked against the code it describes: the Dockerfile,
//! docker-compose.yml with its Prometheus, alert and Grafana files, the
//! Kubernetes manifests, and every command's `--help`.
//!
//! Nothing here needs Docker or a cluster: the files are parsed and
//! cross-checked against the proxy's own config loader, and the compose
//! topology is run as separate `ims-proxy` processes on 127.0.0.1.

mod support;
use support::bin;

use ims_proxy::config::Config;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A file of this repository.
fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// A YAML file as JSON values, one per document, with `<<:` merge keys applied
/// (as docker compose does).
fn yaml_docs(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut v = serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{path} is not YAML: {e}"));
            v.apply_merge()
                .unwrap_or_else(|e| panic!("{path}: bad merge key: {e}"));
            serde_json::to_value(v).unwrap_or_else(|e| panic!("{path}: not JSON-like: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(path: &str) -> Value {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{path}: expected one YAML document");
    docs.remove(0)
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

/// Compose's `${VAR:-default}` with the default: the demo must start with no environment set.
fn compose_expand(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .unwrap_or_else(|| panic!("unclosed ${{ in {s}"))
            + start;
        let inner = &rest[start + 2..end];
        let (_, default) = inner
            .split_once(":-")
            .unwrap_or_else(|| panic!("${{{inner}}} in docker-compose.yml has no default"));
        out.push_str(default);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// A compose service's `environment`, expanded.
fn compose_env(service: &Value) -> HashMap<String, String> {
    service["environment"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), compose_expand(&v))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `(source, target)` of a service's `./source:/target[:ro]` volumes.
fn bind_mounts(service: &Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .filter(|v| v.starts_with("./"))
        .map(|v| {
            let mut parts = v.split(':');
            let src = parts.next().unwrap_or_default().trim_start_matches("./");
            let dst = parts.next().unwrap_or_default();
            (src.to_string(), dst.to_string())
        })
        .collect()
}

/// The value after `--listen` in a service's command.
fn listen_arg(service: &Value) -> SocketAddr {
    let cmd: Vec<&str> = service["command"]
        .as_array()
        .expect("command is a list")
        .iter()
        .map(|v| str_of(v, "command word"))
        .collect();
    let i = cmd
        .iter()
        .position(|w| *w == "--listen")
        .expect("--listen in command");
    cmd[i + 1].parse().expect("--listen ADDR")
}

/// Every `ims_proxy_*` metric name in a text (PromQL expressions, annotations).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("ims_proxy_") {
        let tail = &rest[i..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..len].to_string());
        rest = &tail[len..];
    }
    names
}

/// Every PromQL expression of the Grafana dashboard.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            out.push(str_of(&t["expr"], "target expr").to_string());
        }
    }
    out
}

/// Every alert rule, by name.
fn alert_rules() -> HashMap<String, Value> {
    let rules = yaml("config/alerts.yml");
    let mut out = HashMap::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = str_of(&rule["alert"], "alert name").to_string();
            out.insert(name, rule.clone());
        }
    }
    out
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
        } else {
            current.push_str(t);
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

fn instruction<'a>(lines: &'a [String], name: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(name).filter(|r| r.starts_with(' ')))
        .map(str::trim)
        .collect()
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// A child process, stopped and reaped however the test ends; its stderr goes to a file.
struct Proc {
    child: Child,
    log: tempfile::NamedTempFile,
    name: &'static str,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command) -> Proc {
        let log = tempfile::NamedTempFile::new().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc { child, log, name }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Its exit status, if it has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGTERM, then the exit status (bounded).
    fn terminate(&mut self) -> ExitStatus {
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -TERM {} failed", self.name);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit after SIGTERM:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    let [a] = free_addrs();
    a
}

/// `N` distinct free loopback addresses: all are held at once, so no two are the same port.
fn free_addrs<const N: usize>() -> [SocketAddr; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("addr"))
}

// ---------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerfile_is_multi_stage_non_root_and_its_healthcheck_works() {
    let lines = dockerfile();
    let froms = instruction(&lines, "FROM");
    assert!(froms.len() >= 2, "not multi-stage: {froms:?}");
    assert!(
        froms[0].starts_with("rust:") && froms[0].contains(" AS build"),
        "{froms:?}"
    );
    let last = froms[froms.len() - 1];
    assert!(
        last.starts_with("gcr.io/distroless/cc") || last.contains("-slim"),
        "final image is not small: {last}"
    );
    let users = instruction(&lines, "USER");
    let user = users.last().expect("a USER instruction");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("USER must be numeric (Kubernetes runAsNonRoot): {user}"));
    assert_ne!(uid, 0, "runs as root");
    assert!(
        instruction(&lines, "ENV").contains(&"IMS_PROXY_CONFIG=/etc/ims-proxy/config.toml"),
        "{lines:?}"
    );
    let expose = instruction(&lines, "EXPOSE").join(" ");
    assert!(
        expose.contains("8080") && expose.contains("9464"),
        "{expose}"
    );
    let entrypoint = instruction(&lines, "ENTRYPOINT")[0];
    let entrypoint: Vec<String> = serde_json::from_str(entrypoint).expect("exec-form ENTRYPOINT");
    assert!(
        instruction(&lines, "COPY")
            .iter()
            .any(|c| c.starts_with("--from=build") && c.ends_with(&entrypoint[0])),
        "ENTRYPOINT {entrypoint:?} is not the binary copied from the build stage"
    );
    assert!(read(".dockerignore").lines().any(|l| l.trim() == "target/"));

    // The HEALTHCHECK's exec-form command, run as the image would run it.
    let hc = instruction(&lines, "HEALTHCHECK")[0];
    let cmd = &hc[hc.find("CMD ").expect("HEALTHCHECK CMD") + 4..];
    let argv: Vec<String> = serde_json::from_str(cmd).expect("exec-form HEALTHCHECK CMD");
    assert_eq!(argv[0], entrypoint[0]);
    let h = support::Harness::start().await;
    let args = argv[1..].to_vec();
    let admin = h.server.admin_addr.to_string();
    let healthy = tokio::task::spawn_blocking(move || {
        bin()
            .args(&args)
            .env("IMS_PROXY_ADMIN", admin)
            .output()
            .expect("run healthcheck")
    })
    .await
    .expect("join");
    assert!(
        healthy.status.success(),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    // Nothing listening: unhealthy, with a message naming the address.
    let closed = free_addr().to_string();
    let args = argv[1..].to_vec();
    let closed_for_child = closed.clone();
    let unhealthy = tokio::task::spawn_blocking(move || {
        bin()
            .args(&args)
            .env("IMS_PROXY_ADMIN", closed_for_child)
            .output()
            .expect("run healthcheck")
    })
    .await
    .expect("join");
    assert_eq!(unhealthy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unhealthy.stderr).contains(&closed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_can_ask_readiness_and_reports_a_503() {
    let setup = support::Setup {
        // A secret IMS refuses: the proxy serves (/healthz) but is never ready (/readyz).
        secrets: Some(vec!["wrong".into()]),
        ..Default::default()
    };
    let ims = ims_proxy::sim::SimIms::start().await.expect("sim IMS");
    ims.state().add_client(support::CLIENT_ID, "right");
    ims.state().add_client("fusion-client-id", "fusion-secret");
    let h = support::Harness::with_ims(setup, ims).await;
    let admin = h.server.admin_addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        let alive = bin()
            .args(["healthcheck", "--admin", &admin])
            .output()
            .expect("run");
        let ready = bin()
            .args(["healthcheck", "--admin", &admin, "--path", "/readyz"])
            .output()
            .expect("run");
        (alive, ready)
    })
    .await
    .expect("join");
    assert!(out.0.status.success());
    assert_eq!(out.1.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.1.stderr).contains("answered 503"),
        "{}",
        String::from_utf8_lossy(&out.1.stderr)
    );
}

// ---------------------------------------------------------------------------
// docker compose, Prometheus, Grafana
// ---------------------------------------------------------------------------

#[test]
fn compose_wires_simulators_proxy_prometheus_and_grafana() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_object().expect("services");
    for name in ["sim-ims", "sim-api", "ims-proxy", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "no service {name}");
    }
    let proxy = &services["ims-proxy"];
    assert_eq!(
        proxy["build"], ".",
        "the proxy is built from the Dockerfile"
    );
    let image = str_of(&proxy["image"], "ims-proxy image");
    for sim in ["sim-ims", "sim-api"] {
        assert_eq!(
            services[sim]["image"], image,
            "{sim} runs the proxy's own image"
        );
        assert_eq!(services[sim]["healthcheck"]["disable"], true);
    }
    assert_eq!(services["sim-ims"]["command"][0], "sim-ims");
    assert_eq!(services["sim-api"]["command"][0], "sim-upstream");

    // Every bind-mounted file or folder exists.
    for (name, service) in services {
        for (src, _) in bind_mounts(service) {
            assert!(repo(&src).exists(), "{name} mounts missing ./{src}");
        }
    }

    // The proxy's config: mounted where IMS_PROXY_CONFIG says, valid with compose's environment.
    let env = compose_env(proxy);
    assert_eq!(proxy["command"][0], "run");
    let config_path = &env["IMS_PROXY_CONFIG"];
    let (config_src, _) = bind_mounts(proxy)
        .into_iter()
        .find(|(_, dst)| dst == config_path)
        .expect("the config is mounted at IMS_PROXY_CONFIG");
    let config = Config::parse(&read(&config_src), Path::new("config"), &env)
        .unwrap_or_else(|e| panic!("{config_src}: {e}"));

    // It points at the simulators by service name and port.
    let ims_addr = listen_arg(&services["sim-ims"]);
    let api_addr = listen_arg(&services["sim-api"]);
    assert!(ims_addr.ip().is_unspecified() && api_addr.ip().is_unspecified());
    for c in config.credentials.values() {
        assert_eq!(
            c.token_url,
            format!("http://sim-ims:{}/ims/token/v3", ims_addr.port())
        );
    }
    for r in &config.routes {
        assert_eq!(
            r.upstream_authority.as_str(),
            format!("sim-api:{}", api_addr.port())
        );
    }
    // The simulated IMS knows exactly the proxy's client ids and secrets.
    let clients = compose_env(&services["sim-ims"])["SIM_IMS_CLIENTS"].clone();
    let mut known: Vec<(String, String)> = clients
        .split(',')
        .map(|p| {
            let (id, secret) = p.split_once('=').expect("CLIENT_ID=SECRET");
            (id.to_string(), secret.to_string())
        })
        .collect();
    let mut wanted: Vec<(String, String)> = config
        .credentials
        .values()
        .map(|c| (c.client_id.clone(), c.secrets[0].expose().to_string()))
        .collect();
    known.sort();
    wanted.sort();
    assert_eq!(known, wanted);

    // Both proxy ports are published and reachable from the other containers.
    let ports: Vec<&str> = proxy["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| str_of(p, "port"))
        .collect();
    for addr in [config.server.listen, config.server.admin_listen] {
        assert!(
            addr.ip().is_unspecified(),
            "{addr} unreachable from outside the container"
        );
        assert!(
            ports.contains(&format!("{0}:{0}", addr.port()).as_str()),
            "{ports:?}"
        );
    }
    // Compose waits longer than the proxy drains.
    let stop: Duration =
        humantime::parse_duration(str_of(&proxy["stop_grace_period"], "stop_grace_period"))
            .expect("duration");
    assert!(stop > config.server.shutdown_grace);

    // Prometheus scrapes the admin port by service name and loads the alert rules it is given.
    let prom_service = &services["prometheus"];
    let prom_mounts = bind_mounts(prom_service);
    let (prom_src, _) = prom_mounts
        .iter()
        .find(|(_, dst)| dst == "/etc/prometheus/prometheus.yml")
        .expect("prometheus.yml mounted where the image reads it");
    let prom = yaml(prom_src);
    let job = &prom["scrape_configs"][0];
    assert_eq!(job["metrics_path"], "/metrics");
    assert_eq!(
        job["static_configs"][0]["targets"][0],
        format!("ims-proxy:{}", config.server.admin_listen.port())
    );
    for rule_file in prom["rule_files"].as_array().expect("rule_files") {
        let rule_file = str_of(rule_file, "rule file");
        let (src, _) = prom_mounts
            .iter()
            .find(|(_, dst)| dst == rule_file)
            .unwrap_or_else(|| panic!("rule file {rule_file} is not mounted"));
        assert!(!yaml_docs(src).is_empty());
    }
    assert_eq!(
        services["prometheus"]["depends_on"]["ims-proxy"]["condition"],
        "service_healthy"
    );

    // Grafana: the provisioned datasource is compose's Prometheus, the dashboards folder is mounted
    // where the provider reads, and the dashboard uses that datasource.
    let grafana = &services["grafana"];
    let mounts = bind_mounts(grafana);
    let (prov_src, _) = mounts
        .iter()
        .find(|(_, dst)| dst == "/etc/grafana/provisioning")
        .expect("provisioning mounted");
    let ds = yaml(&format!("{prov_src}/datasources/prometheus.yml"));
    let ds = &ds["datasources"][0];
    assert_eq!(ds["type"], "prometheus");
    assert_eq!(ds["url"], "http://prometheus:9090");
    let provider = yaml(&format!("{prov_src}/dashboards/ims-proxy.yml"));
    let dash_dir = str_of(
        &provider["providers"][0]["options"]["path"],
        "provider path",
    );
    let (dash_src, _) = mounts
        .iter()
        .find(|(_, dst)| dst == dash_dir)
        .expect("dashboards mounted where the provider reads");
    let home = &compose_env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"];
    let home_file = home
        .strip_prefix(&format!("{dash_dir}/"))
        .expect("home dashboard inside the dashboards folder");
    let dashboard: Value =
        serde_json::from_str(&read(&format!("{dash_src}/{home_file}"))).expect("dashboard JSON");
    let uid = str_of(&ds["uid"], "datasource uid");
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], uid, "{}", panel["title"]);
        }
    }
}

#[test]
fn dashboard_shows_what_operators_ask_for() {
    let dashboard: Value =
        serde_json::from_str(&read("config/grafana/dashboards/ims-proxy.json")).expect("JSON");
    let exprs = dashboard_exprs(&dashboard);
    let has = |what: &str, pred: &dyn Fn(&str) -> bool| {
        assert!(
            exprs.iter().any(|e| pred(e)),
            "no panel for {what}: {exprs:#?}"
        );
    };
    has("request rate by route and client", &|e| {
        e.contains("rate(ims_proxy_requests_total") && e.contains("by (route, client)")
    });
    for q in ["0.5", "0.95", "0.99"] {
        has("latency percentiles by route and client", &|e| {
            e.contains(&format!("histogram_quantile({q},"))
                && e.contains("ims_proxy_request_duration_seconds_bucket")
                && e.contains("route, client")
        });
    }
    has("errors by status", &|e| {
        e.contains("by (status)") && e.contains("ims_proxy_requests_total")
    });
    has("upstream latency", &|e| {
        e.contains("ims_proxy_upstream_duration_seconds_bucket")
    });
    has("token time to expiry", &|e| {
        e.contains("ims_proxy_token_expiry_timestamp_seconds") && e.contains("time()")
    });
    has("refresh failures", &|e| {
        e.contains("ims_proxy_token_refreshes_total")
            || e.contains("ims_proxy_token_fetch_errors_total")
    });
    has("in-flight requests", &|e| {
        e.contains("ims_proxy_inflight_requests")
    });
    // Panel ids are unique, or Grafana silently drops panels.
    let ids: Vec<i64> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .map(|p| p["id"].as_i64().expect("panel id"))
        .collect();
    let unique: BTreeSet<&i64> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
}

#[test]
fn alert_rules_cover_expiry_readiness_errors_and_latency() {
    let rules = alert_rules();
    for (name, rule) in &rules {
        let expr = str_of(&rule["expr"], "expr");
        assert!(
            expr.contains("ims_proxy_") || expr.contains("up{"),
            "{name}"
        );
        assert!(rule["for"].is_string(), "{name} has no `for`");
        assert!(
            matches!(
                rule["labels"]["severity"].as_str(),
                Some("critical" | "warning")
            ),
            "{name}"
        );
        assert!(rule["annotations"]["summary"].is_string(), "{name}");
    }
    let expr = |name: &str| {
        str_of(
            &rules.get(name).unwrap_or_else(|| panic!("no alert {name}"))["expr"],
            "expr",
        )
        .to_string()
    };
    let e = expr("ImsProxyTokenExpiringRefreshFailing");
    assert!(
        e.contains("ims_proxy_token_expiry_timestamp_seconds")
            && e.contains("< 600")
            && e.contains("ims_proxy_token_refreshes_total{result=\"error\"}"),
        "{e}"
    );
    let e = expr("ImsProxyNotReady");
    assert!(e.contains("up{job=\"ims-proxy\"} == 0"), "{e}");
    let e = expr("ImsProxyHigh5xxRatio");
    assert!(e.contains("status=~\"5..\"") && e.contains('/'), "{e}");
    let e = expr("ImsProxyHighP99Latency");
    assert!(
        e.contains("histogram_quantile(0.99")
            && e.contains("ims_proxy_request_duration_seconds_bucket"),
        "{e}"
    );
    // The job name the rules select is the one Prometheus scrapes.
    let prom = yaml("config/prometheus.yml");
    assert_eq!(prom["scrape_configs"][0]["job_name"], "ims-proxy");
}

/// A GET's status and body, `None` when it cannot connect or gets no answer.
async fn try_get(url: &str) -> Option<(u16, String)> {
    use http_body_util::BodyExt;
    let req = http::Request::get(url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    // Bounded: a port another process took may accept and never answer.
    let answer = async {
        let resp = support::client().request(req).await.ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(2), answer)
        .await
        .ok()
        .flatten()
}

/// The compose topology as three processes on loopback, the proxy ready.
struct Topology {
    sim_ims: Proc,
    sim_api: Proc,
    proxy: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Starts the topology, with new ports when another process took one of ours
/// between our pick and its bind (tests run in parallel).
async fn start_topology(services: &Value) -> Topology {
    for _ in 0..3 {
        match try_start_topology(services).await {
            Ok(t) => return t,
            Err(log) if log.contains("in use") => eprintln!("a port was taken, again:\n{log}"),
            Err(log) => panic!("the compose topology did not start:\n{log}"),
        }
    }
    panic!("the compose topology found its ports taken three times");
}

/// One start; the log of a process that exited before the proxy was ready.
async fn try_start_topology(services: &Value) -> Result<Topology, String> {
    let [ims_addr, api_addr, listen, admin] = free_addrs();
    let ims_port = listen_arg(&services["sim-ims"]).port();
    let api_port = listen_arg(&services["sim-api"]).port();
    let text = read("config/compose.toml")
        .replace(&format!("sim-ims:{ims_port}"), &ims_addr.to_string())
        .replace(&format!("sim-api:{api_port}"), &api_addr.to_string())
        .replace("0.0.0.0:8080", &listen.to_string())
        .replace("0.0.0.0:9464", &admin.to_string());
    assert!(
        !text
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("sim-")),
        "a service name was left:\n{text}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &text).expect("write config");

    let sim_ims = Proc::spawn(
        "sim-ims",
        bin()
            .args(["sim-ims", "--listen", &ims_addr.to_string()])
            .env(
                "SIM_IMS_CLIENTS",
                &compose_env(&services["sim-ims"])["SIM_IMS_CLIENTS"],
            ),
    );
    let sim_api = Proc::spawn(
        "sim-upstream",
        bin().args(["sim-upstream", "--listen", &api_addr.to_string()]),
    );
    let mut cmd = bin();
    cmd.args(["run"]).env("IMS_PROXY_CONFIG", &config_path);
    for (k, v) in compose_env(&services["ims-proxy"]) {
        if k != "IMS_PROXY_CONFIG" {
            cmd.env(k, v);
        }
    }
    let proxy = Proc::spawn("ims-proxy run", &mut cmd);
    let mut t = Topology {
        sim_ims,
        sim_api,
        proxy,
        listen,
        admin,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for p in [&mut t.sim_ims, &mut t.sim_api, &mut t.proxy] {
            if let Some(st) = p.exited() {
                return Err(format!("{} exited ({st}):\n{}", p.name, p.log()));
            }
        }
        // The body tells the proxy's readiness from any other server's 200.
        if let Some((200, body)) = try_get(&format!("http://{admin}/readyz")).await {
            if serde_json::from_str::<Value>(&body).is_ok_and(|v| v["ready"] == true) {
                return Ok(t);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the proxy never became ready:\n{}",
            t.proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The compose topology without Docker: the simulators and the proxy as
/// separate processes of the same binary, with config/compose.toml pointed at
/// 127.0.0.1. Requests work, and every metric the dashboard and the alert
/// rules use is in the proxy's /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_topology_serves_and_exports_every_metric_the_dashboard_and_alerts_use() {
    let compose = yaml("docker-compose.yml");
    let Topology {
        mut sim_ims,
        mut sim_api,
        mut proxy,
        listen,
        admin,
        _dir,
    } = start_topology(&compose["services"]).await;

    let key = ("x-proxy-key", "compose-demo-key");
    let url = |p: &str| format!("http://{listen}{p}");
    let r = support::get(
        &url("/workfront/attask/api/v19.0/proj/search?fields=name"),
        &[key],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let echo = r.json();
    assert!(
        echo["headers"]["authorization"]
            .as_str()
            .is_some_and(|a| a.starts_with("Bearer sim-")),
        "{echo}"
    );
    assert!(!r.text().contains("compose-demo-key"), "{echo}");
    let r = support::get(&url("/fusion/api/v3/scenarios?teamId=1"), &[key]).await;
    assert_eq!(r.json()["headers"]["x-gw-region"], "or2");
    support::get(&url("/workfront/attask/api/v19.0/proj/search"), &[])
        .await
        .assert_refusal(401, "unauthorized");
    let r = support::get(&url("/workfront/status/429"), &[key]).await;
    assert_eq!(r.status, 429);
    // The simulated API goes away: 502 and an upstream error.
    assert!(sim_api.terminate().success(), "{}", sim_api.log());
    let mut saw_502 = false;
    for _ in 0..5 {
        if support::get(&url("/workfront/x"), &[key]).await.status == 502 {
            saw_502 = true;
            break;
        }
    }
    assert!(
        saw_502,
        "no 502 after the upstream stopped:\n{}",
        proxy.log()
    );

    let metrics = support::get(&format!("http://{admin}/metrics"), &[])
        .await
        .text();
    let exported: BTreeSet<String> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_string())
        .collect();
    let dashboard: Value =
        serde_json::from_str(&read("config/grafana/dashboards/ims-proxy.json")).expect("JSON");
    let mut used = metric_names(&dashboard_exprs(&dashboard).join("\n"));
    used.extend(metric_names(&read("config/alerts.yml")));
    assert!(
        used.len() >= 12,
        "suspiciously few metric names found: {used:?}"
    );
    // A histogram is named by its family in prose, exported as `_bucket`, `_sum`, `_count`.
    let missing: Vec<&String> = used
        .iter()
        .filter(|m| !exported.contains(*m) && !exported.contains(&format!("{m}_bucket")))
        .collect();
    assert!(
        missing.is_empty(),
        "used in the dashboard or alerts but not exported: {missing:?}\n/metrics:\n{metrics}"
    );

    assert!(proxy.terminate().success(), "{}", proxy.log());
    assert!(sim_ims.terminate().success(), "{}", sim_ims.log());
}

// ---------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------

/// The manifests of config/kubernetes by kind.
fn manifests() -> HashMap<String, Value> {
    let dir = repo("config/kubernetes");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("config/kubernetes")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    files.sort();
    let kustomization = yaml("config/kubernetes/kustomization.yaml");
    let mut listed: Vec<String> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| str_of(r, "resource").to_string())
        .collect();
    listed.sort();
    assert_eq!(
        listed, files,
        "kustomization.yaml lists exactly the manifests"
    );
    let mut out = HashMap::new();
    for f in files {
        for doc in yaml_docs(&format!("config/kubernetes/{f}")) {
            let kind = str_of(&doc["kind"], "kind").to_string();
            assert!(doc["apiVersion"].is_string(), "{f}: no apiVersion");
            assert!(out.insert(kind.clone(), doc).is_none(), "two {kind}s");
        }
    }
    out
}

/// A container port by name or number.
fn container_port(container: &Value, port: &Value) -> u16 {
    match port {
        Value::Number(n) => n.as_u64().expect("port number") as u16,
        Value::String(name) => container["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == *name)
            .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
            .as_u64()
            .expect("containerPort") as u16,
        other => panic!("bad port {other}"),
    }
}

#[test]
fn kubernetes_manifests_agree_with_each_other_and_with_the_config() {
    let m = manifests();
    for kind in [
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    ] {
        assert!(m.contains_key(kind), "no {kind}");
    }
    let deploy = &m["Deployment"];
    let pod = &deploy["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(deploy["spec"]["selector"]["matchLabels"], *labels);
    let selects_pods = |selector: &Value, what: &str| {
        for (k, v) in selector.as_object().expect("selector") {
            assert_eq!(labels[k], *v, "{what} selector {k} does not match the pods");
        }
    };
    selects_pods(&m["Service"]["spec"]["selector"], "Service");
    selects_pods(
        &m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget",
    );
    let container = &pod["spec"]["containers"][0];
    let env: HashMap<&str, &str> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            (
                str_of(&e["name"], "env name"),
                str_of(&e["value"], "env value"),
            )
        })
        .collect();

    // The ConfigMap is mounted so that IMS_PROXY_CONFIG finds its config.toml.
    let cm = &m["ConfigMap"];
    let volume = pod["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["configMap"]["name"] == cm["metadata"]["name"])
        .expect("a volume from the ConfigMap");
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|vm| vm["name"] == volume["name"])
        .expect("the ConfigMap volume is mounted");
    assert!(
        mount["subPath"].is_null(),
        "subPath mounts never see ConfigMap updates"
    );
    let config_file = env["IMS_PROXY_CONFIG"];
    let (dir, file) = config_file.rsplit_once('/').expect("absolute path");
    assert_eq!(mount["mountPath"], dir);
    let toml = str_of(&cm["data"][file], "ConfigMap config.toml");

    // The config validates with exactly the environment the Secret provides.
    let secret = &m["Secret"];
    assert_eq!(
        container["envFrom"][0]["secretRef"]["name"],
        secret["metadata"]["name"]
    );
    let secret_env: HashMap<String, String> = secret["stringData"]
        .as_object()
        .expect("stringData")
        .iter()
        .map(|(k, v)| (k.clone(), str_of(v, "secret value").to_string()))
        .collect();
    let config = Config::parse(toml, Path::new(dir), &secret_env)
        .unwrap_or_else(|e| panic!("ConfigMap config.toml: {e}"));
    for var in secret_env.keys() {
        assert!(
            toml.contains(&format!("${{{var}}}")),
            "Secret key {var} is unused"
        );
    }

    // Probes: readiness on /readyz, liveness on /healthz, both on the admin port.
    let admin_port = config.server.admin_listen.port();
    let listen_port = config.server.listen.port();
    assert!(config.server.admin_listen.ip().is_unspecified());
    assert!(config.server.listen.ip().is_unspecified());
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            container_port(container, &get["port"]),
            admin_port,
            "{probe}"
        );
    }
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        admin_port.to_string()
    );
    // The Service sends clients to the proxy's listen port.
    let svc_port = &m["Service"]["spec"]["ports"][0];
    assert_eq!(
        container_port(container, &svc_port["targetPort"]),
        listen_port
    );

    // Drains finish before Kubernetes kills the pod.
    let grace = deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    assert!(Duration::from_secs(grace - pre_stop) > config.server.shutdown_grace);

    // Non-root, as the image's USER.
    let sc = &pod["spec"]["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    let user = instruction(&dockerfile(), "USER")
        .last()
        .map(|u| u.split(':').next().unwrap_or_default().to_string())
        .expect("USER");
    assert_eq!(sc["runAsUser"].to_string(), user);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert!(
        container["resources"]["requests"]["cpu"].is_string(),
        "the HPA needs a CPU request"
    );

    // The HPA scales this Deployment and never below what the PDB needs to allow a drain.
    let hpa = &m["HorizontalPodAutoscaler"]["spec"];
    assert_eq!(hpa["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["scaleTargetRef"]["name"], deploy["metadata"]["name"]);
    let min = hpa["minReplicas"].as_u64().expect("minReplicas");
    let max = hpa["maxReplicas"].as_u64().expect("maxReplicas");
    let pdb_min = m["PodDisruptionBudget"]["spec"]["minAvailable"]
        .as_u64()
        .expect("minAvailable");
    assert!(
        pdb_min < min && min <= max,
        "pdb {pdb_min}, hpa {min}..{max}"
    );
    assert!(deploy["spec"]["replicas"].as_u64().expect("replicas") >= min);
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

#[test]
fn every_command_has_help_with_an_example() {
    let top = bin().arg("--help").output().expect("run --help");
    assert!(top.status.success());
    let top = String::from_utf8_lossy(&top.stdout).into_owned();
    for cmd in [
        "run",
        "check",
        "hash-key",
        "demo",
        "healthcheck",
        "sim-ims",
        "sim-upstream",
    ] {
        assert!(top.contains(cmd), "`--help` does not list {cmd}:\n{top}");
        let out = bin().args([cmd, "--help"]).output().expect("run help");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{cmd} --help failed");
        assert!(
            text.contains("Example") && text.contains(&format!("ims-proxy {cmd}")),
            "{cmd} --help has no example:\n{text}"
        );
    }
}

#[test]
fn sim_ims_help_never_shows_the_secrets_in_its_environment() {
    let out = bin()
        .args(["sim-ims", "--help"])
        .env("SIM_IMS_CLIENTS", "id=SuperSecretValue")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SIM_IMS_CLIENTS"), "{text}");
    assert!(!text.contains("SuperSecretValue"), "{text}");
}
