//! Build script: records the git commit the binary is built from, for `--version` and the
//! `cache_invalidator_build_info` gauge. A build without git (a Docker build from a tarball, a
//! crate download) says `unknown` instead of failing; `CACHE_INVALIDATOR_COMMIT` set at build time
//! wins, for packagers who know the commit but ship no `.git`.

use std::path::Path;
use std::process::Command;

/// What `--version` and the gauge say when the commit cannot be known.
const UNKNOWN_COMMIT: &str = "unknown";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CACHE_INVALIDATOR_COMMIT");
    let commit = std::env::var("CACHE_INVALIDATOR_COMMIT")
        .ok()
        .filter(|commit| !commit.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| UNKNOWN_COMMIT.to_owned());
    println!("cargo:rustc-env=CACHE_INVALIDATOR_COMMIT={}", commit.trim());
    // Build again when HEAD moves: HEAD itself changes on a checkout, the branch's ref (loose or
    // packed) on a commit. Only existing files are named: cargo reruns the script every build
    // for a path that does not exist.
    for name in ["HEAD", "packed-refs"] {
        watch(git(&["rev-parse", "--git-path", name]));
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch(git(&["rev-parse", "--git-path", &branch]));
    }
}

fn git_commit() -> Option<String> {
    git(&["rev-parse", "--short", "HEAD"])
}

/// One line of git's output, `None` when git is missing, fails, or says nothing.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let line = text.trim();
    (!line.is_empty()).then(|| line.to_owned())
}

fn watch(path: Option<String>) {
    if let Some(path) = path.filter(|path| Path::new(path).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
}
