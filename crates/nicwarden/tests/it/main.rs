//! Integration tests of the `nicwarden` binary that need no running controller: help texts,
//! argument errors, config errors, and errors when nothing listens.
//!
//! End-to-end tests against a real controller and agents are in `e2e.rs`; privileged tests
//! of enforcement on real packets in a namespaced testbed are in `enforce.rs`.

mod dashboard;
mod e2e;
mod enforce;
mod harness;
mod live_cli;
mod mesh;
mod topology;

use std::path::Path;
use std::process::{Command, Output};

/// Runs the built binary with a clean `NICWARDEN_*` environment.
fn nicwarden(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nicwarden"));
    for (k, _) in std::env::vars() {
        if k.starts_with("NICWARDEN_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "off")
        .args(args)
        .output()
        .expect("run the nicwarden binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every (sub)command, as a path of words.
const COMMANDS: &[&[&str]] = &[
    &[],
    &["controller"],
    &["agent"],
    &["agent", "status"],
    &["agent", "tamper"],
    &["node"],
    &["node", "add"],
    &["node", "list"],
    &["node", "show"],
    &["node", "remove"],
    &["node", "token"],
    &["node", "rotate-key"],
    &["node", "tamper"],
    &["lease"],
    &["lease", "grant"],
    &["lease", "list"],
    &["lease", "show"],
    &["lease", "change"],
    &["lease", "renew"],
    &["lease", "revoke"],
    &["quota"],
    &["quota", "show"],
    &["quota", "set"],
    &["audit"],
    &["audit", "verify"],
    &["events"],
    &["top"],
    &["demo"],
    &["bench"],
    &["bench", "shaping"],
    &["bench", "backends"],
    &["bench", "scale"],
    &["bench", "volume"],
    &["bench", "latency"],
    &["bench", "telemetry"],
    &["bench", "tunnel"],
    &["sim"],
    &["traffic"],
    &["traffic", "sink"],
    &["traffic", "send"],
];

#[test]
fn every_help_has_an_example_of_itself() {
    for path in COMMANDS {
        let mut args = path.to_vec();
        args.push("--help");
        let out = nicwarden(&args);
        let text = stdout(&out);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(
            text.contains("Example"),
            "{args:?} --help has no example:\n{text}"
        );
        // The example runs this very command (`nicwarden lease grant ...`).
        let invocation = std::iter::once("nicwarden")
            .chain(path.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        let example_lines: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("Example"))
            .collect();
        assert!(
            example_lines
                .iter()
                .any(|l| l.trim_start().starts_with(&invocation)),
            "{args:?} --help has no example starting with `{invocation}`:\n{text}"
        );
    }
}

#[test]
fn help_does_not_reveal_token_env_values() {
    let out = Command::new(env!("CARGO_BIN_EXE_nicwarden"))
        .env("NICWARDEN_TOKEN", "s3cr3t-operator")
        .env("NICWARDEN_JOIN_TOKEN", "s3cr3t-join")
        .args(["node", "list", "--help"])
        .output()
        .expect("run");
    assert!(!stdout(&out).contains("s3cr3t"), "{}", stdout(&out));
    let out = Command::new(env!("CARGO_BIN_EXE_nicwarden"))
        .env("NICWARDEN_JOIN_TOKEN", "s3cr3t-join")
        .args(["agent", "--help"])
        .output()
        .expect("run");
    assert!(!stdout(&out).contains("s3cr3t"), "{}", stdout(&out));
}

#[test]
fn version_prints() {
    let out = nicwarden(&["--version"]);
    assert!(out.status.success());
    assert!(stdout(&out).starts_with("nicwarden "), "{}", stdout(&out));
}

/// (arguments, text the error must contain). None of these reach the network.
const BAD_ARGS: &[(&[&str], &[&str])] = &[
    (
        &["lease", "grant", "node-1", "--rate", "fast"],
        &[
            "--rate",
            "`fast` is not a rate; examples: 200Mbit, 1.5G, 500k",
        ],
    ),
    (
        &["lease", "grant", "node-1", "--rate", "200MB"],
        &["--rate", "looks like bytes"],
    ),
    (&["lease", "grant", "node-1"], &["--rate"]),
    (
        &["lease", "grant", "node-1", "--rate", "1G", "--burst", "big"],
        &["--burst", "`big` is not a byte count"],
    ),
    (
        &["lease", "grant", "node-1", "--rate", "1G", "--ttl", "soon"],
        &["--ttl", "`soon` is not a duration"],
    ),
    (
        &[
            "lease", "grant", "node-1", "--rate", "1G", "--scope", "north",
        ],
        &["--scope", "peer:NODE"],
    ),
    (&["lease", "change", "seven", "--rate", "1G"], &["seven"]),
    (
        &["lease", "list", "--state", "sleepy"],
        &["sleepy", "active"],
    ),
    (&["quota", "set", "fabric"], &["--capacity"]),
    (
        &[
            "quota",
            "set",
            "fabric",
            "--capacity",
            "1G",
            "--algorithm",
            "random",
        ],
        &["random", "fair_share"],
    ),
    (
        &["node", "add", "n1", "--capacity", "x"],
        &["--capacity", "is not a rate"],
    ),
    (
        &["node", "add", "n1", "--token-ttl", "x"],
        &["--token-ttl", "is not a duration"],
    ),
    (
        &["controller", "--fabric-capacity", "lots"],
        &["--fabric-capacity", "is not a rate"],
    ),
    (
        &["controller", "--api-listen", "nowhere"],
        &["--api-listen"],
    ),
    (
        &["agent", "--counters", "simulated:fast"],
        &["--counters", "is not a rate"],
    ),
    (&["agent", "--node", "n1", "status"], &["status"]),
    (&["audit", "--limit", "5", "verify"], &["verify"]),
    (&["bench"], &["subcommand", "shaping", "latency"]),
    (
        &["bench", "shaping", "--rates", "fast"],
        &["--rates", "is not a rate"],
    ),
    (&["bench", "scale", "--scopes", "0"], &["--scopes", "0"]),
    (
        &["bench", "volume", "--volume", "10Mb"],
        &["--volume", "ambiguous"],
    ),
    (&["frobnicate"], &["frobnicate"]),
];

#[test]
fn bad_arguments_fail_clearly() {
    for (args, wants) in BAD_ARGS {
        let out = nicwarden(args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded");
        for want in *wants {
            assert!(
                err.contains(want),
                "{args:?}: stderr lacks {want:?}:\n{err}"
            );
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path.to_str().expect("utf-8 path").to_string()
}

#[test]
fn controller_config_errors_name_the_file_and_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown.toml",
            "api_listn = \"127.0.0.1:7080\"\n",
            &["unknown.toml", "api_listn"],
        ),
        (
            "type.toml",
            "fabric_capacity_bps = \"lots\"\n",
            &["type.toml", "fabric_capacity_bps"],
        ),
        (
            "addr.toml",
            "api_listen = \"nowhere\"\n",
            &["addr.toml", "api_listen"],
        ),
        ("syntax.toml", "data_dir = \n", &["syntax.toml"]),
        (
            "algo.toml",
            "fabric_algorithm = \"random\"\n",
            &["invalid config", "fabric_algorithm"],
        ),
        (
            "same.toml",
            "agent_listen = \"127.0.0.1:9000\"\napi_listen = \"127.0.0.1:9000\"\n",
            &["invalid config", "agent_listen and api_listen"],
        ),
    ];
    for (name, text, wants) in cases {
        let path = write(dir.path(), name, text);
        let out = nicwarden(&["controller", "--config", &path]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.starts_with("error: "), "{name}: {err}");
        for want in *wants {
            assert!(err.contains(want), "{name}: stderr lacks {want:?}:\n{err}");
        }
    }
    let out = nicwarden(&["controller", "--config", "/nonexistent/controller.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/nonexistent/controller.toml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn agent_config_errors_are_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "agent.toml",
        "node = \"n1\"\ncontroler = \"x\"\n",
    );
    let out = nicwarden(&["agent", "--config", &path]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("agent.toml") && err.contains("controler"),
        "{err}"
    );

    let out = nicwarden(&["agent"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--node"), "{}", stderr(&out));

    let out = nicwarden(&["agent", "--node", "n1", "--controller", "http://ctl:7443"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("https://HOST:PORT"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn agent_datapath_settings_are_checked_before_start() {
    let check = |args: &[&str], want: &str| {
        let mut all = vec!["agent", "--node", "n1"];
        all.extend(args);
        let out = nicwarden(&all);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {want:?} not in {err}");
    };
    check(
        &["--datapath", "bpf"],
        "datapath backend must be `ebpf`, `tc` or `none`",
    );
    check(
        &["--counters", "simulated:1G"],
        "cannot be used with datapath backend `ebpf`",
    );
    check(
        &["--datapath", "tc", "--counters", "simulated:1G"],
        "cannot be used with datapath backend `tc`",
    );
    check(
        &["--peer", "n2=198.18.0.0/24", "--peer", "n3=198.18.0.3"],
        "overlaps",
    );
    check(&["--peer", "n1=198.18.0.2"], "is this node itself");
    check(
        &["--fabric-iface", "a-very-long-interface-name"],
        "not a valid interface name",
    );
    let out = nicwarden(&["agent", "--node", "n1", "--peer", "n2=198.18.0.300"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not an IPv4 prefix"),
        "{}",
        stderr(&out)
    );
}

/// `demo` and the benchmarks say what privilege they need, and why, when they lack it.
#[test]
fn demo_without_privileges_says_what_it_needs() {
    for cmd in [
        "demo",
        "bench shaping",
        "bench backends",
        "bench scale",
        "bench volume",
        "bench latency",
        "bench tunnel",
    ] {
        let words: Vec<&str> = cmd.split(' ').collect();
        let bin = env!("CARGO_BIN_EXE_nicwarden");
        // As root (CI), drop the two capabilities; otherwise we lack them already.
        let out = if Command::new("id")
            .arg("-u")
            .output()
            .map(|o| stdout(&o).trim() == "0")
            .unwrap_or(false)
        {
            Command::new("setpriv")
                .args(["--bounding-set=-net_admin,-sys_admin", "--", bin])
                .args(&words)
                .env("RUST_LOG", "off")
                .output()
                .expect("run setpriv (util-linux)")
        } else {
            nicwarden(&words)
        };
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.contains(&format!("{cmd} needs root")) && err.contains("CAP_NET_ADMIN"),
            "{cmd}: {err}"
        );
    }
}

/// A local port with nothing listening on it (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn unreachable_api_names_the_url_and_the_controller() {
    let api = format!("http://127.0.0.1:{}", closed_port());
    let out = nicwarden(&["node", "list", "--api", &api, "--token", "t"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(&api), "{err}");
    assert!(err.contains("nicwarden controller"), "{err}");
}

#[test]
fn unreadable_token_file_names_the_file() {
    let out = nicwarden(&[
        "quota",
        "show",
        "--token-file",
        "/nonexistent/operator.token",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("/nonexistent/operator.token"), "{err}");
}

#[test]
fn unreachable_agent_status_names_the_address() {
    let addr = format!("127.0.0.1:{}", closed_port());
    let out = nicwarden(&["agent", "status", "--status-addr", &addr]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&addr), "{err}");
    assert!(err.contains("nicwarden agent"), "{err}");
}
