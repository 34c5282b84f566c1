//! deploy/kubernetes: the manifests (with gen-nodes.sh's per-node objects) validate against the
//! Kubernetes schemas (kubernetes-validate, strict) and the custom resources against their CRDs'
//! schemas (deploy/kubernetes/schemas/validate.py); and a node's pod, as its volumes lay it
//! out, renders a config with the initContainer's own command that `migtun check` accepts.
//! Needs python3 with PyYAML and jsonschema, and kubernetes-validate (.ci/run installs them).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const MIGTUN: &str = env!("CARGO_BIN_EXE_migtun");
/// The custom resources the manifests use: kubernetes-validate has no schema for them.
const CUSTOM_KINDS: [&str; 4] = ["Certificate", "Issuer", "ClusterIssuer", "ServiceMonitor"];
/// The built-in kinds the manifests use, each validated by kubernetes-validate.
const BUILTIN_KINDS: [&str; 5] = ["Namespace", "ServiceAccount", "Service", "ConfigMap", "DaemonSet"];
/// Kubernetes versions the manifests are validated against: an old supported one and
/// kubernetes-validate's newest.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", ""];

fn kube_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// Says loudly that `what` is missing; fails under CI, where .ci/run installs it.
fn missing(what: &str) {
    let msg = format!("{what} not found (.ci/run installs it): deploy/kubernetes is NOT validated");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
    eprintln!("\n*** deploy_kubernetes: {msg} ***\n");
}

/// python3 with PyYAML and jsonschema (kubernetes-validate depends on both).
fn python() -> Option<&'static str> {
    let ok = Command::new("python3").args(["-c", "import yaml, jsonschema"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        missing("python3 with PyYAML and jsonschema");
    }
    ok.then_some("python3")
}

fn ok(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{what}: {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The YAML documents of `path`, as JSON values.
fn documents(python: &str, path: &Path) -> Vec<Value> {
    let out = Command::new(python)
        .args(["-c", "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None], sys.stdout)"])
        .arg(path)
        .output()
        .unwrap();
    serde_json::from_str(&ok("read YAML", out)).expect("YAML as JSON")
}

/// The manifests of the folder plus gen-nodes.sh's objects for `nodes`, written to `dir`.
fn manifests(dir: &Path, nodes: &[&str]) -> Vec<PathBuf> {
    let rendered = dir.join("nodes.yaml");
    let out = Command::new(kube_dir().join("gen-nodes.sh")).args(nodes).output().unwrap();
    std::fs::write(&rendered, ok("gen-nodes.sh", out)).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(kube_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files.push(rendered);
    files
}

#[test]
fn manifests_validate_against_the_kubernetes_and_the_crd_schemas() {
    let Some(python) = python() else { return };
    if Command::new("kubernetes-validate").arg("--version").output().is_err() {
        return missing("kubernetes-validate (pip install kubernetes-validate)");
    }
    let dir = tempfile::tempdir().unwrap();
    let files = manifests(dir.path(), &["node-a", "node-b.example.com"]);
    let docs: Vec<(String, String)> = files
        .iter()
        .flat_map(|f| documents(python, f))
        .map(|d| (d["kind"].as_str().unwrap_or("?").to_string(), d["metadata"]["name"].as_str().unwrap_or("?").to_string()))
        .collect();
    let kinds: BTreeSet<&str> = docs.iter().map(|(k, _)| k.as_str()).collect();
    let expected: BTreeSet<&str> = CUSTOM_KINDS.iter().chain(BUILTIN_KINDS.iter()).copied().collect();
    assert_eq!(kinds, expected, "the kinds the manifests use");
    let builtin = docs.iter().filter(|(k, _)| BUILTIN_KINDS.contains(&k.as_str())).count();

    for version in KUBERNETES_VERSIONS {
        let mut cmd = Command::new("kubernetes-validate");
        cmd.arg("--strict");
        if !version.is_empty() {
            cmd.args(["--kubernetes-version", version]);
        }
        let out = cmd.args(&files).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "kubernetes-validate {version}:\n{text}");
        let passed = text.lines().filter(|l| l.starts_with("INFO") && l.contains(" passed for resource ")).count();
        assert_eq!(passed, builtin, "kubernetes-validate {version} passed every built-in object:\n{text}");
        for line in text.lines().filter(|l| !l.starts_with("INFO")) {
            let custom = CUSTOM_KINDS.iter().any(|k| line.contains(&format!("Couldn't find schema for kind {k} ")));
            assert!(line.starts_with("WARN") && custom, "kubernetes-validate {version}: only the custom kinds lack a schema: {line}");
        }
    }

    // The custom resources against their CRDs' schemas.
    let out = Command::new(python).arg(kube_dir().join("schemas/validate.py")).args(&files).output().unwrap();
    let text = ok("schemas/validate.py", out);
    for (kind, name) in &docs {
        let word = if CUSTOM_KINDS.contains(&kind.as_str()) { "ok" } else { "skip" };
        assert!(text.lines().any(|l| l == format!("{word} {kind} {name}")), "validate.py: {word} {kind} {name}:\n{text}");
    }
}

/// The validators are not blind: a field neither schema knows fails each.
#[test]
fn the_validators_refuse_unknown_fields() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let files = manifests(dir.path(), &["node-a"]);
    let nodes = std::fs::read_to_string(files.last().unwrap()).unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, nodes.replace("  renewBefore: 720h\n", "  renewBefore: 720h\n  renewBeforeDays: 30\n")).unwrap();
    let out = Command::new(python).arg(kube_dir().join("schemas/validate.py")).arg(&bad).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stdout).contains("renewBeforeDays"), "validate.py refuses it");
    if Command::new("kubernetes-validate").arg("--version").output().is_err() {
        return missing("kubernetes-validate (pip install kubernetes-validate)");
    }
    std::fs::write(&bad, nodes.replace("      hostPID: true\n", "      hostPID: true\n      hostPid: true\n")).unwrap();
    let out = Command::new("kubernetes-validate").arg("--strict").arg(&bad).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hostPid"), "kubernetes-validate refuses it");
}

#[test]
fn gen_nodes_refuses_names_that_are_not_dns_names() {
    for bad in ["Node_A", "-a", "a..b", &"n".repeat(64), "a/b"] {
        let out = Command::new(kube_dir().join("gen-nodes.sh")).arg(bad).output().unwrap();
        assert!(!out.status.success(), "{bad:?} refused");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a DNS name"), "{bad:?}");
    }
}

/// Replaces, in `text`, every absolute path under one of `mounts` (longest first, whole path
/// components only) by the same path under `root`.
fn localize(text: &str, mounts: &[String], root: &Path) -> String {
    let mut sorted: Vec<&String> = mounts.iter().collect();
    sorted.sort_by_key(|m| std::cmp::Reverse(m.len()));
    let mut out = String::new();
    let mut rest = text;
    'scan: while !rest.is_empty() {
        for m in &sorted {
            if let Some(after) = rest.strip_prefix(m.as_str()) {
                let boundary = !out.ends_with(|c: char| c.is_alphanumeric() || "/._-".contains(c));
                if boundary && after.chars().next().is_none_or(|c| !(c.is_alphanumeric() || "._-".contains(c))) {
                    out.push_str(&root.join(m.trim_start_matches('/')).display().to_string());
                    rest = after;
                    continue 'scan;
                }
            }
        }
        let c = rest.chars().next().unwrap_or_default();
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
}

/// node-b's DaemonSet, as the kubelet would lay out its pod (ConfigMap files, emptyDir, the
/// node's certificate Secret, host directories) under a temporary root: the initContainer's
/// command renders node-b's config, which `migtun check` (the container's args, `serve`
/// replaced by `check`) accepts, without node-b among its own peers.
#[test]
fn a_nodes_pod_renders_a_config_that_migtun_check_accepts() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let files = manifests(dir.path(), &["node-b"]);
    let all: Vec<Value> = files.iter().flat_map(|f| documents(python, f)).collect();
    let find = |kind: &str| all.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("a {kind}")).clone();
    let ds = find("DaemonSet");
    let configmap = find("ConfigMap");
    let certificate = all.iter().find(|d| d["kind"] == "Certificate" && d["metadata"]["name"] == "migtun-node-b").expect("node-b's Certificate");
    assert_eq!(strings(&certificate["spec"]["dnsNames"]), ["node-b"], "the node name is the DNS SAN");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let volumes = pod["volumes"].as_array().expect("volumes");
    let volume = |name: &str| volumes.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("volume {name}"));
    let init = &pod["initContainers"][0];
    let main = &pod["containers"][0];
    let ports: Vec<(i64, &str)> =
        main["ports"].as_array().unwrap().iter().map(|p| (p["containerPort"].as_i64().unwrap_or(0), p["protocol"].as_str().unwrap_or(""))).collect();
    assert!(ports.contains(&(7443, "TCP")) && ports.contains(&(7443, "UDP")), "the one port, TCP and UDP: {ports:?}");
    let host_paths: BTreeSet<&str> = volumes.iter().filter_map(|v| v["hostPath"]["path"].as_str()).collect();
    assert_eq!(host_paths, BTreeSet::from(["/run/migtun", "/var/lib/migtun", "/run/vms"]), "the image's VOLUMEs, from the host");
    assert_eq!(volume("tls")["secret"]["secretName"], certificate["spec"]["secretName"], "the pod mounts its node's Secret");

    let root = dir.path().join("root");
    let mut mounts: Vec<String> = Vec::new();
    for container in [init, main] {
        for m in container["volumeMounts"].as_array().unwrap() {
            let path = m["mountPath"].as_str().unwrap().to_string();
            let at = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(&at).unwrap();
            let v = volume(m["name"].as_str().unwrap());
            if v["configMap"].is_object() {
                for (key, text) in configmap["data"].as_object().unwrap() {
                    std::fs::write(at.join(key), text.as_str().unwrap()).unwrap();
                }
            }
            mounts.push(path);
        }
    }
    // The Secret cert-manager writes: tls.crt, tls.key, ca.crt (here from `migtun certs`).
    let pki = dir.path().join("pki");
    for args in [vec!["certs", "init", "--dir"], vec!["certs", "issue", "--name", "node-b", "--dir"]] {
        ok("migtun certs", Command::new(MIGTUN).args(&args).arg(&pki).output().unwrap());
    }
    let tls = root.join("etc/migtun-tls");
    for (from, to) in [("node-b.pem", "tls.crt"), ("node-b.key", "tls.key"), ("ca.pem", "ca.crt")] {
        std::fs::copy(pki.join(from), tls.join(to)).unwrap();
        let mode = volume("tls")["secret"]["defaultMode"].as_u64().expect("the Secret's defaultMode") as u32;
        std::fs::set_permissions(tls.join(to), std::fs::Permissions::from_mode(mode)).unwrap();
    }

    let render = |host_ip: &str| {
        let argv: Vec<String> = strings(&init["command"]).iter().map(|a| localize(a, &mounts, &root)).collect();
        let out = Command::new(&argv[0]).args(&argv[1..]).env("NODE_NAME", "node-b").env("HOST_IP", host_ip).output().unwrap();
        ok("the render-config initContainer", out);
        std::fs::read_to_string(root.join("etc/migtun/migtun.toml")).unwrap()
    };
    assert!(render("fd00::2").contains("metrics = \"[fd00::2]:9477\""), "an IPv6 host address in brackets");
    let config = render("127.0.0.1");
    assert!(config.contains("name = \"node-b\"") && !config.contains('@'), "every placeholder filled:\n{config}");
    assert!(!config.contains("name = \"node-b\"\naddress"), "node-b is not its own peer:\n{config}");
    assert!(!config.contains("to-node-b.sock"), "nor forwards to itself:\n{config}");
    assert!(config.contains("allow = [\"node-a\", \"node-c\"]") && config.contains("allow_sources = [\"node-a\", \"node-c\"]"), "{config}");
    // The pod's addresses are the node's; a test binds no fixed port: listen and metrics on
    // ephemeral ports here, as the only change to what the pod gets.
    assert!(config.contains("listen = \"0.0.0.0:7443\"") && config.contains("metrics = \"127.0.0.1:9477\""), "{config}");
    let config = config.replace("0.0.0.0:7443", "127.0.0.1:0").replace("127.0.0.1:9477", "127.0.0.1:0");
    let config = localize(&config, &mounts, &root);
    std::fs::write(root.join("etc/migtun/migtun.toml"), &config).unwrap();

    let mut args: Vec<String> = strings(&main["args"]).iter().map(|a| localize(a, &mounts, &root)).collect();
    assert_eq!(args[0], "serve");
    args[0] = "check".into();
    let explained = ok("migtun check of the rendered config", Command::new(MIGTUN).args(&args).output().unwrap());
    for peer in ["node-a", "node-c"] {
        assert!(explained.contains(peer), "check explains peer {peer}:\n{explained}");
    }
}
