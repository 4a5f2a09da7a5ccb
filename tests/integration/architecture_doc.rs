//! Keeps `docs/ARCHITECTURE.md` true: every path and Rust name it puts in backticks must exist.
//!
//! The rules, applied to each inline code span (text between two backticks on one line):
//! 1. Spans inside fenced code blocks (between lines starting with three backticks) are not read.
//! 2. A line with an odd number of backticks is reported: a span must open and close on one line.
//! 3. A span that contains a `/`, does not start with one, and holds only letters, digits and
//!    `_ . - /` is a repository path. It must exist, relative to the repository's root; a `..`
//!    segment is reported, since it leaves the repository.
//! 4. A span made only of identifiers joined by `::` is a Rust name. Its last segment must be
//!    defined somewhere in the `.rs` files under `crates/`, `src/` and `tests/`: after a
//!    `fn`, `struct`, `enum`, `trait`, `type`, `const`, `static`, `mod` or `union` keyword, as
//!    an enum variant (a line that starts with a capitalised identifier followed by nothing,
//!    `,`, `(`, `{` or `=`) or as a field (a line that starts with an identifier followed by one
//!    `:`), or as a crate's name. Each earlier segment must be a module (declared with `mod`, or a
//!    file or folder of that name), a type (`struct`, `enum`, `trait`, `type`, `union`) or a
//!    crate (a package of the workspace, `-` read as `_`).
//! 5. Every other span is not a name and is skipped: anything with a space, `=`, a quote, `*`,
//!    brackets or other punctuation; a flag (`-x`); a file name without a folder (`inbox.sqlite`);
//!    a number; a path starting with `/` (a URL's path, not the repository's).
//!
//! The check scans text; it does not resolve paths as the compiler does (it does not check that
//! `Store::route` is a method of that `Store`), so a name can pass by matching an item of the same
//! name elsewhere. What it does catch is a name or path that no longer exists anywhere: a renamed
//! function, a moved file, a deleted test. It must never need a network or a build: plain string
//! scanning of the repository.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The repository's root: the root package's manifest directory.
fn repository_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What the workspace's sources define, as the rules above read them.
#[derive(Debug, Default)]
struct Workspace {
    root: PathBuf,
    /// Names a Rust name's last segment may be: items, variants, fields, crates.
    defined: BTreeSet<String>,
    /// Names an earlier segment may be: modules, files, folders, types, crates.
    containers: BTreeSet<String>,
}

/// The item keywords whose next identifier is a definition (rule 4).
const ITEM_KEYWORDS: [&str; 9] = [
    "fn", "struct", "enum", "trait", "type", "const", "static", "mod", "union",
];
/// Of those, the ones that define a type or a module (an earlier segment may name them).
const CONTAINER_KEYWORDS: [&str; 6] = ["struct", "enum", "trait", "type", "mod", "union"];
/// Words that may stand before an item keyword.
const QUALIFIERS: [&str; 6] = ["async", "unsafe", "extern", "\"C\"", "default", "mut"];

impl Workspace {
    /// Reads every `.rs` file under `crates/`, `src/` and `tests/`, and every package's name.
    fn index(root: &Path) -> Workspace {
        let mut workspace = Workspace {
            root: root.to_path_buf(),
            ..Workspace::default()
        };
        let mut manifests = vec![root.join("Cargo.toml")];
        let crates = std::fs::read_dir(root.join("crates")).expect("crates/ is readable");
        for entry in crates {
            manifests.push(entry.expect("a crates/ entry").path().join("Cargo.toml"));
        }
        for manifest in manifests {
            if let Ok(text) = std::fs::read_to_string(&manifest) {
                workspace.add_package(&text);
            }
        }
        let mut files = Vec::new();
        for top in ["crates", "src", "tests"] {
            rust_files(&root.join(top), &mut files);
        }
        for file in files {
            workspace.add_module_names(&file);
            let text = std::fs::read_to_string(&file).expect("a source file is readable");
            for line in text.lines() {
                workspace.add_definitions(line);
            }
        }
        workspace
    }

    /// The package's name (its first `name = "..."` line), with `-` read as `_`.
    fn add_package(&mut self, manifest: &str) {
        let name = manifest.lines().find_map(|line| {
            let value = line
                .trim()
                .strip_prefix("name")?
                .trim_start()
                .strip_prefix('=')?;
            Some(value.trim().trim_matches('"').replace('-', "_"))
        });
        if let Some(name) = name {
            self.defined.insert(name.clone());
            self.containers.insert(name);
        }
    }

    /// A file is a module of its own name, and so is each folder it sits in below the root.
    fn add_module_names(&mut self, file: &Path) {
        let relative = file
            .strip_prefix(&self.root)
            .expect("a file under the root");
        for component in relative.components() {
            let name = component.as_os_str().to_string_lossy();
            let name = name.strip_suffix(".rs").unwrap_or(&name);
            if is_identifier(name) && !matches!(name, "lib" | "main" | "mod") {
                self.defined.insert(name.to_string());
                self.containers.insert(name.to_string());
            }
        }
    }

    /// What one line of Rust defines, by rule 4 (comments and attributes define nothing).
    fn add_definitions(&mut self, line: &str) {
        let text = line.trim_start();
        if text.starts_with("//") || text.starts_with('#') {
            return;
        }
        let text = strip_visibility(text);
        // Item keywords and qualifiers in any order (`const fn`, `static mut`, `pub async fn`),
        // then the name, after the last keyword.
        let mut keyword = None;
        let mut words = text.split_whitespace();
        let next = loop {
            match words.next() {
                Some(word) if ITEM_KEYWORDS.contains(&word) => keyword = Some(word),
                Some(word) if QUALIFIERS.contains(&word) => {}
                next => break next,
            }
        };
        if let (Some(keyword), Some(next)) = (keyword, next) {
            let name = identifier_prefix(next);
            if !name.is_empty() {
                self.defined.insert(name.to_string());
                if CONTAINER_KEYWORDS.contains(&keyword) {
                    self.containers.insert(name.to_string());
                }
            }
            return;
        }
        let name = identifier_prefix(text);
        if name.is_empty() {
            return;
        }
        let rest = &text[name.len()..];
        let starts_capitalised = name.starts_with(|c: char| c.is_ascii_uppercase());
        let variant = starts_capitalised
            && (rest.trim().is_empty() || rest.trim_start().starts_with([',', '(', '{', '=']));
        let field = rest.starts_with(':') && !rest.starts_with("::");
        if variant || field {
            self.defined.insert(name.to_string());
        }
    }
}

/// Every `.rs` file below `dir`, leaving out build output (`target`) and hidden folders.
fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, files);
            }
        } else if name.ends_with(".rs") {
            files.push(path);
        }
    }
}

/// `pub`, `pub(crate)`, `pub(super)`, `pub(in path)` taken off the front.
fn strip_visibility(text: &str) -> &str {
    let Some(rest) = text.strip_prefix("pub") else {
        return text;
    };
    if let Some(inside) = rest.strip_prefix('(') {
        return inside
            .split_once(')')
            .map_or(text, |(_, after)| after.trim_start());
    }
    if rest.starts_with(char::is_whitespace) {
        rest.trim_start()
    } else {
        text
    }
}

fn is_identifier_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The identifier `text` starts with ("" if none).
fn identifier_prefix(text: &str) -> &str {
    if !text.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        return "";
    }
    let end = text
        .find(|c: char| !is_identifier_char(c))
        .unwrap_or(text.len());
    &text[..end]
}

fn is_identifier(text: &str) -> bool {
    !text.is_empty() && identifier_prefix(text) == text
}

/// What a code span is, by rules 3 to 5.
#[derive(Debug, PartialEq)]
enum Span<'a> {
    Path(&'a str),
    RustName(Vec<&'a str>),
    NotAName,
}

fn classify(span: &str) -> Span<'_> {
    let path_chars = |c: char| is_identifier_char(c) || matches!(c, '.' | '-' | '/');
    if span.contains('/') && !span.starts_with('/') && span.chars().all(path_chars) {
        return Span::Path(span);
    }
    let segments: Vec<&str> = span.split("::").collect();
    if segments.iter().all(|segment| is_identifier(segment)) {
        return Span::RustName(segments);
    }
    Span::NotAName
}

/// One name or path the document gets wrong.
#[derive(Debug)]
struct Problem {
    line: usize,
    span: String,
    why: String,
}

/// Every problem of `document` against `workspace`, in the order of its lines.
fn check(document: &str, workspace: &Workspace) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut in_fence = false;
    for (number, line) in document.lines().enumerate() {
        let mut report = |span: &str, why: String| {
            problems.push(Problem {
                line: number + 1,
                span: span.to_string(),
                why,
            });
        };
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        if line.matches('`').count() % 2 == 1 {
            report(
                line.trim(),
                "an odd number of backticks: a span must close on its line".into(),
            );
            continue;
        }
        for span in line.split('`').skip(1).step_by(2) {
            match classify(span) {
                Span::Path(path) => {
                    if path.split('/').any(|segment| segment == "..") {
                        report(span, "a path that leaves the repository".into());
                    } else if !workspace.root.join(path).exists() {
                        report(span, "no such file or folder in the repository".into());
                    }
                }
                Span::RustName(segments) => {
                    let (last, earlier) = segments.split_last().expect("split gives one segment");
                    for segment in earlier {
                        if !workspace.containers.contains(*segment) {
                            report(span, format!("no module, file, type or crate `{segment}`"));
                        }
                    }
                    if !workspace.defined.contains(*last) {
                        report(span, format!("nothing named `{last}` is defined"));
                    }
                }
                Span::NotAName => {}
            }
        }
    }
    problems
}

#[test]
fn every_path_and_name_in_architecture_md_exists() {
    let root = repository_root();
    let document = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md"))
        .expect("docs/ARCHITECTURE.md is readable");
    let problems = check(&document, &Workspace::index(&root));
    let listing: Vec<String> = problems
        .iter()
        .map(|p| format!("  docs/ARCHITECTURE.md:{}: `{}`: {}", p.line, p.span, p.why))
        .collect();
    assert!(
        problems.is_empty(),
        "docs/ARCHITECTURE.md names what does not exist (fix the document or the rules in \
         tests/integration/architecture_doc.rs):\n{}",
        listing.join("\n")
    );
}

#[test]
fn the_checker_accepts_what_exists_and_lists_what_does_not() {
    let workspace = Workspace::index(&repository_root());
    // (document, the spans it must report, in order)
    let cases: &[(&str, &[&str])] = &[
        // Real names and paths.
        ("`tidings_core::routing::decide` and `routing::decide`", &[]),
        ("`SendOrder`, `Store::route`, `RouteCache`, `state::Shared`", &[]),
        ("`crates/store/src/lib.rs`, `docs/BENCHMARKS.md`, `crates/bench/peers/`", &[]),
        ("`privacy::p1_an_unregistered_profile_opens_no_connection`", &[]),
        ("a variant `Unavailable` and a field `receipt_wait_seconds`", &[]),
        // A renamed function, a missing module, a missing type.
        ("`tidings_core::routing::decide_everything`", &["tidings_core::routing::decide_everything"]),
        ("`tidings_core::routings::decide`", &["tidings_core::routings::decide"]),
        ("`NoSuchStore::route`", &["NoSuchStore::route"]),
        // A type the code no longer has.
        ("`state::Db`", &["state::Db"]),
        // A missing path, and one that leaves the repository.
        ("`crates/store/src/sqlite_engine.rs`", &["crates/store/src/sqlite_engine.rs"]),
        ("`docs/bench/run-1405721/`", &["docs/bench/run-1405721/"]),
        ("`../shared/STYLE.md`", &["../shared/STYLE.md"]),
        // A missing test, and a test named in a module that is not its file.
        ("`privacy::p1_an_unregistered_profile_sends_nothing`", &["privacy::p1_an_unregistered_profile_sends_nothing"]),
        ("`privcy::p1_an_unregistered_profile_opens_no_connection`", &["privcy::p1_an_unregistered_profile_opens_no_connection"]),
        // Not names: skipped.
        ("`tidings server`, `synchronous = FULL`, `\"outbox\"`, `--insecure`, `-Zprint-type-sizes`", &[]),
        ("`inbox.sqlite`, `/v1/openapi.json`, `4096`, `fallback::tests::*`, `AT+CMGS=<n>`", &[]),
        ("```\n`NotAName` in a fence\n```\nafter it", &[]),
        // Spans must close on their line; every missing name on a line is listed.
        ("an odd ` backtick", &["an odd ` backtick"]),
        ("`NoSuchThing` and `no_such_function`", &["NoSuchThing", "no_such_function"]),
    ];
    for (document, expected) in cases {
        let reported: Vec<String> = check(document, &workspace)
            .into_iter()
            .map(|p| p.span)
            .collect();
        assert_eq!(&reported, expected, "for the document {document:?}");
    }
}
