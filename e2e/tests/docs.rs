//! What the READMEs tell people to use exists: every repository path they quote as code and
//! every `make TARGET` they name. A README once told readers to run `hm-ns main make bench`, a
//! helper that was never in the repository. Pure: reads files, needs no lab.

use std::collections::BTreeSet;
use std::path::Path;

/// The READMEs a newcomer reads, relative to the repository root.
const READMES: &[&str] = &["README.md", "e2e/lab/README.md", "e2e/kind/README.md", "charts/harness-mesh/README.md"];

/// A quoted bare file name with one of these extensions (`ns.sh`, `pause.c`) names a file that
/// must be somewhere in the repository.
const FILE_EXTENSIONS: &[&str] = &[".sh", ".py", ".rs", ".c", ".env"];

/// A quoted word that starts with one of these is a path in the repository.
const TOP_DIRS: &[&str] =
    &["e2e/", "crates/", "controller/", "charts/", "crds/", "docs/", "examples/", "images/", ".ci/", ".github/"];

/// The text of every code span and fenced code block in a Markdown document.
fn code(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            out.push(line.to_owned());
            continue;
        }
        // Inline spans: the odd-numbered pieces between backticks.
        out.extend(line.split('`').skip(1).step_by(2).map(str::to_owned));
    }
    out
}

/// The targets a Makefile defines (`name:` at the start of a line).
fn make_targets(makefile: &str) -> BTreeSet<String> {
    makefile
        .lines()
        .filter_map(|l| l.split_once(':').map(|(name, _)| name))
        .filter(|name| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
        .map(str::to_owned)
        .collect()
}

/// The names of every file in the repository (below `root`, leaving out build and lab output).
fn file_names(root: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if !["target", ".git", ".lab"].contains(&name.as_str()) {
                    dirs.push(entry.path());
                }
            } else {
                names.insert(name);
            }
        }
    }
    names
}

/// What a README's code names that does not exist: paths (relative to the repository root, or to
/// the README's own folder), bare script and source file names, and make targets. Placeholders
/// (`<name>`, `*`, `{a,b}`, `$VAR`) end a path: only the folder before them must exist.
fn missing(readme: &str, readme_dir: &Path, root: &Path, targets: &BTreeSet<String>) -> Vec<String> {
    let files = file_names(root);
    let mut missing = BTreeSet::new();
    for span in code(readme) {
        let words: Vec<&str> = span.split(|c: char| c.is_whitespace() || "\"'()=,;|".contains(c)).collect();
        for (i, word) in words.iter().enumerate() {
            if *word == "make"
                && let Some(target) = words.get(i + 1)
                && !target.is_empty()
                && !target.starts_with('-')
                && !target.contains('=')
                && !targets.contains(*target)
            {
                missing.insert(format!("make {target}"));
            }
            let path = word.trim_start_matches("./").trim_end_matches(['.', ':', ']', '>']);
            let bare_file = !path.contains('/') && FILE_EXTENSIONS.iter().any(|ext| path.ends_with(ext));
            if bare_file && !files.contains(path) {
                missing.insert(path.to_owned());
            }
            if !TOP_DIRS.iter().any(|top| path.starts_with(top)) {
                continue;
            }
            let concrete = match path.find(['<', '*', '{', '$']) {
                Some(at) => &path[..path[..at].rfind('/').map_or(0, |slash| slash + 1)],
                None => path,
            };
            if !root.join(concrete).exists() && !readme_dir.join(concrete).exists() {
                missing.insert(path.to_owned());
            }
        }
    }
    missing.into_iter().collect()
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e/ is inside the repository")
}

#[test]
fn everything_the_readmes_name_exists() {
    let root = repo_root();
    let targets = make_targets(&std::fs::read_to_string(root.join("Makefile")).expect("Makefile"));
    assert!(targets.contains("test") && targets.contains("demo"), "no targets read from the Makefile: {targets:?}");
    let mut problems = Vec::new();
    for readme in READMES {
        let path = root.join(readme);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let dir = path.parent().expect("a README is in a folder");
        problems.extend(missing(&text, dir, root, &targets).into_iter().map(|m| format!("{readme}: {m}")));
    }
    assert!(problems.is_empty(), "the READMEs name what the repository does not have:\n{}", problems.join("\n"));
}

#[test]
fn a_missing_path_or_target_is_reported() {
    let root = repo_root();
    let targets: BTreeSet<String> = ["demo", "test"].map(str::to_owned).into();
    let readme = "Run `make demo`, then `make bench`, `e2e/lab/hm-ns.sh main` and `hm-ns.sh`; `lab.sh` is there.\n\
                  ```sh\nmake test NODES=3   # and e2e/lab/lab.sh, crates/<name>/Cargo.toml, crds/*.yaml\n\
                  ./e2e/lab/nowhere.sh\n```\n";
    assert_eq!(
        missing(readme, root, root, &targets),
        ["e2e/lab/hm-ns.sh", "e2e/lab/nowhere.sh", "hm-ns.sh", "make bench"],
        "existing paths and placeholders pass, missing ones are named"
    );
}
