use super::*;
use std::collections::HashMap;

const KEY: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn base() -> String {
    format!(
        r#"
[credentials.workfront]
client_id = "abc"
client_secret = "${{WF_SECRET}}"
scopes = ["openid", "AdobeID"]

[[routes]]
name = "workfront"
prefix = "/workfront/"
upstream = "https://acme.my.workfront.com/base/"
credential = "workfront"
headers = {{ "x-gw-region" = "or2" }}

[[access.keys]]
name = "etl"
sha256 = "{KEY}"
"#
    )
}

fn env() -> HashMap<String, String> {
    HashMap::from([("WF_SECRET".to_string(), "s3cr3t".to_string())])
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("."), &env())
}

#[test]
fn minimal_config_gets_the_spec_defaults() {
    let c = parse(&base()).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9464");
    assert_eq!(c.server.max_scrub_body_bytes, 1_048_576);
    assert_eq!(c.ims.token_url, DEFAULT_TOKEN_URL);
    assert_eq!(c.ims.refresh_margin, Duration::from_secs(3600));
    let cred = &c.credentials["workfront"];
    assert_eq!(cred.secrets[0].expose(), "s3cr3t");
    let r = &c.routes[0];
    assert_eq!(r.prefix, "/workfront");
    assert_eq!(r.upstream_base_path, "/base");
    assert!(r.strip_prefix && r.send_api_key && !r.pass_cookies);
    assert_eq!(r.headers[0].0, "x-gw-region");
    assert_eq!(c.access.mode, AccessMode::Keys);
}

#[test]
fn secrets_never_show_in_debug_output() {
    let c = parse(&base()).unwrap();
    let dump = format!("{c:?}");
    assert!(!dump.contains("s3cr3t"), "{dump}");
}

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn unknown_route_credential_names_the_key() {
    let text = base().replace("credential = \"workfront\"", "credential = \"fusoin\"");
    let e = err(&text);
    assert!(
        e.starts_with("routes[0].credential: no credential named \"fusoin\""),
        "{e}"
    );
}

#[test]
fn typo_in_a_key_is_an_error_naming_it() {
    let e = err(&format!("[server]\nlistn = \"127.0.0.1:1\"\n{}", base()));
    assert!(e.contains("server") && e.contains("listn"), "{e}");
}

#[test]
fn bad_duration_names_the_key() {
    let e = err(&format!("[ims]\nrefresh_margin = \"soon\"\n{}", base()));
    assert!(e.starts_with("ims.refresh_margin:"), "{e}");
}

#[test]
fn wrong_type_names_the_key() {
    let e = err(&format!(
        "[server]\nmax_scrub_body_bytes = \"big\"\n{}",
        base()
    ));
    assert!(e.starts_with("server.max_scrub_body_bytes"), "{e}");
}

#[test]
fn missing_environment_variable_names_key_and_variable() {
    let e = Config::parse(&base(), Path::new("."), &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("credentials.workfront.client_secret") && e.contains("WF_SECRET"),
        "{e}"
    );
}

#[test]
fn bad_key_digest_names_the_key() {
    let e = err(&base().replace(KEY, "xyz"));
    assert!(e.starts_with("access.keys[0].sha256:"), "{e}");
}

#[test]
fn open_mode_on_network_address_needs_explicit_consent() {
    let text = format!(
        "[server]\nlisten = \"0.0.0.0:8080\"\n[access]\nmode = \"open\"\n{}",
        base().split("[[access.keys]]").next().unwrap()
    );
    let e = err(&text);
    assert!(e.starts_with("access.mode:"), "{e}");
    let ok = text.replace(
        "mode = \"open\"",
        "mode = \"open\"\nallow_open_on_network = true",
    );
    assert_eq!(parse(&ok).unwrap().access.mode, AccessMode::Open);
}

#[test]
fn reserved_route_header_is_refused() {
    let e = err(&base().replace("\"x-gw-region\" = \"or2\"", "\"Authorization\" = \"x\""));
    assert!(e.starts_with("routes[0].headers.Authorization:"), "{e}");
}

#[test]
fn secret_file_is_read_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "from-file\n").unwrap();
    let text = base().replace(
        "client_secret = \"${WF_SECRET}\"",
        "client_secret_file = \"secret\"",
    );
    let c = Config::parse(&text, dir.path(), &env()).unwrap();
    assert_eq!(c.credentials["workfront"].secrets[0].expose(), "from-file");
    let e = Config::parse(&text, Path::new("/nonexistent"), &env())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("credentials.workfront.client_secret_file:"),
        "{e}"
    );
}

#[test]
fn two_secrets_allowed_three_refused() {
    let two = base().replace(
        "client_secret = \"${WF_SECRET}\"",
        "client_secrets = [\"a\", \"b\"]",
    );
    assert_eq!(
        parse(&two).unwrap().credentials["workfront"].secrets.len(),
        2
    );
    let three = base().replace(
        "client_secret = \"${WF_SECRET}\"",
        "client_secrets = [\"a\", \"b\", \"c\"]",
    );
    assert!(err(&three).starts_with("credentials.workfront.client_secrets:"));
}

#[test]
fn key_route_list_must_name_routes() {
    let text = base().replace(
        &format!("sha256 = \"{KEY}\""),
        &format!("sha256 = \"{KEY}\"\nroutes = [\"fusion\"]"),
    );
    assert!(err(&text).starts_with("access.keys[0].routes[0]:"));
}

#[test]
fn syntax_errors_name_the_line() {
    let e = err(&format!(
        "[server]\nidle_timeout = \"1s\"\nidle_timeout = \"2s\"\n{}",
        base()
    ));
    assert!(
        e.starts_with("line 3:") && e.contains("idle_timeout"),
        "{e}"
    );
}

#[test]
fn shipped_example_config_is_valid() {
    let env: HashMap<String, String> = [
        "WF_CLIENT_ID",
        "WF_CLIENT_SECRET",
        "FUSION_CLIENT_ID",
        "FUSION_CLIENT_SECRET",
        "WFB_CLIENT_ID",
        "WFB_CLIENT_SECRET",
    ]
    .iter()
    .map(|k| (k.to_string(), format!("value-of-{k}")))
    .collect();
    let c = Config::parse(
        include_str!("../../config/example.toml"),
        Path::new("."),
        &env,
    )
    .unwrap();
    let names: Vec<&str> = c.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["workfront", "fusion", "workflow-builder"]);
    let fusion = c.routes.iter().find(|r| r.name == "fusion").unwrap();
    let headers: Vec<&str> = fusion.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(headers.contains(&"x-gw-region") && headers.contains(&"x-organization-id"));
    assert!(c.credentials["workflow_builder"]
        .scopes
        .contains(&"ff_apis".to_string()));
}

#[test]
fn parser_errors_never_echo_a_value() {
    let text = base().replace(
        "client_secret = \"${WF_SECRET}\"",
        "client_secrets = \"LiteralS3cret\"",
    );
    let e = err(&text);
    assert!(
        e.starts_with("credentials.workfront.client_secrets:"),
        "{e}"
    );
    assert!(!e.contains("LiteralS3cret"), "{e}");
    let quoted = base().replace(
        "client_secret = \"${WF_SECRET}\"",
        r#"client_secrets = "ab\"cd-secret-tail""#,
    );
    let e = err(&quoted);
    assert!(!e.contains("secret-tail") && !e.contains("ab"), "{e}");
}

#[test]
fn url_errors_quote_the_value_as_written_not_expanded() {
    let mut env = env();
    env.insert("PROXY_PASS".into(), "hunter2".into());
    let text = format!(
        "[outbound]\nproxy = \"ftp://u:${{PROXY_PASS}}@proxy\"\n{}",
        base()
    );
    let e = Config::parse(&text, Path::new("."), &env)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("outbound.proxy:") && !e.contains("hunter2"),
        "{e}"
    );
    let e = err(&base().replace(
        "https://acme.my.workfront.com/base/",
        "https://user:pw@acme.my.workfront.com",
    ));
    assert!(
        e.starts_with("routes[0].upstream:") && e.contains("user:password"),
        "{e}"
    );
}

/// The 1-based line of the first line of `text` containing `needle`.
fn line_containing(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in the text"))
}

#[test]
fn semantic_errors_carry_the_line_of_their_key() {
    let text = base().replace("credential = \"workfront\"", "credential = \"fusoin\"");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.key, "routes[0].credential");
    assert_eq!(e.line, Some(line_containing(&text, "fusoin")));
    // Parsed without a file, the message reads as before: key first.
    assert!(e.to_string().starts_with("routes[0].credential:"), "{e}");
}

#[test]
fn errors_from_a_file_read_file_line_key_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let text = format!(
        "{}\n[[routes]]\nname = \"second\"\nprefix = \"/second\"\nupstream = \"https://example.com\"\ncredential = \"nope\"\n",
        base()
    );
    std::fs::write(&path, &text).unwrap();
    let e = Config::load_with_env(&path, &env()).unwrap_err();
    let line = line_containing(&text, "\"nope\"");
    assert_eq!(e.line, Some(line));
    assert_eq!(
        e.to_string(),
        format!(
            "{}:{line}: routes[1].credential: no credential named \"nope\" (known: [\"workfront\"])",
            path.display()
        )
    );
}

#[test]
fn a_missing_key_is_located_at_its_table() {
    let text = base().replace("scopes = [\"openid\", \"AdobeID\"]\n", "");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.key, "credentials.workfront.scopes");
    assert_eq!(
        e.line,
        Some(line_containing(&text, "[credentials.workfront]"))
    );
}

#[test]
fn keys_in_the_second_of_an_array_of_tables_and_inline_tables_are_located() {
    let text = format!(
        "{}\n[[access.keys]]\nname = \"other\"\nsha256 = \"{KEY}\"\nroutes = [\"workfront\", \"nowhere\"]\n",
        base()
    );
    let e = parse(&text).unwrap_err();
    assert_eq!(e.key, "access.keys[1].routes[1]");
    assert_eq!(e.line, Some(line_containing(&text, "\"nowhere\"")));

    let text = base().replace("\"x-gw-region\" = \"or2\"", "\"Host\" = \"evil\"");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.key, "routes[0].headers.Host");
    assert_eq!(e.line, Some(line_containing(&text, "headers = ")));
}

#[test]
fn type_errors_and_unknown_keys_carry_the_parser_line() {
    let text = format!(
        "{}\n[server]\nidle_timeout = \"1s\"\nlistn = \"x\"\n",
        base()
    );
    let e = parse(&text).unwrap_err();
    assert_eq!(e.line, Some(line_containing(&text, "listn")));
    assert!(e.to_string().contains("listn"), "{e}");
}

#[test]
fn a_dotted_key_at_the_top_level_is_located() {
    let text = format!("server.idle_timeout = \"soon\"\n{}", base());
    let e = parse(&text).unwrap_err();
    assert_eq!(e.key, "server.idle_timeout");
    assert_eq!(e.line, Some(1));
}

#[test]
fn located_errors_still_never_echo_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let text = base().replace(
        "client_secret = \"${WF_SECRET}\"",
        "client_secrets = [\"one-S3cret\", \"two-S3cret\", \"three-S3cret\"]",
    );
    std::fs::write(&path, &text).unwrap();
    let e = Config::load_with_env(&path, &env())
        .unwrap_err()
        .to_string();
    let line = line_containing(&text, "client_secrets");
    assert!(
        e.contains(&format!(":{line}: credentials.workfront.client_secrets:")),
        "{e}"
    );
    assert!(!e.contains("S3cret"), "{e}");
}
