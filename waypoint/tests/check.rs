//! `waypoint --check`: the exit code and the messages a user reads.

use std::process::Command;

fn check(files: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .arg("--check")
        .arg(dir.path())
        .output()
        .expect("run waypoint");
    let stdout =
        String::from_utf8_lossy(&out.stdout).replace(&*dir.path().to_string_lossy(), "DIR");
    (out.status.code().unwrap_or(-1), stdout)
}

const GOOD: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: catalog}\nspec:\n  hosts: [catalog]\n  http:\n  - route: [{destination: {host: catalog}}]\n    retries: {attempts: 3, retryOn: 5xx}\n";

#[test]
fn good_files_pass() {
    let (code, out) = check(&[("a.yaml", GOOD)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 resources accepted, 0 rejected"), "{out}");
}

#[test]
fn errors_name_file_line_document_resource_and_field_and_fail() {
    let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: catalog}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 3, retryOn: 5xx}\n    timout: 2s\n";
    let (code, out) = check(&[("a.yaml", GOOD), ("b.yml", bad), ("notes.txt", "ignored")]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("DIR/b.yml:13:5: error: document 2, VirtualService bookinfo/reviews, spec.http[0].timout: unknown field"),
        "{out}"
    );
    assert!(
        out.contains("1 resources accepted, 1 rejected, 1 of other kinds skipped"),
        "{out}"
    );
}

#[test]
fn warnings_alone_do_not_fail() {
    let warn = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: catalog}\nspec:\n  host: catalog\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n";
    let (code, out) = check(&[("dr.yaml", warn)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("warning: document 1, DestinationRule default/catalog, spec.trafficPolicy.tls: accepted, not implemented"), "{out}");
}

#[test]
fn compile_errors_fail_too() {
    let bad = GOOD.replace("retryOn: 5xx", "retryOn: 5xxx");
    let (code, out) = check(&[("a.yaml", &bad)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("spec.http[0].retries.retryOn: unknown retry condition \"5xxx\""),
        "{out}"
    );
    assert!(out.contains("0 resources accepted, 1 rejected"), "{out}");
}
