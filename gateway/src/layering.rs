//! The library's import rules, checked on its own source: imports only
//! point down (model → stages → engine → surfaces), the store imports
//! nothing but the model, and no two modules import each other through any
//! path. A change that breaks a rule fails this test with the offending
//! edge, before a reviewer has to spot it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The library's top-level modules by layer; lower layers never import
/// higher ones.
const LAYERS: &[(&str, &[&str])] = &[
    ("leaf", &["util", "spiffe_id", "model", "metrics"]),
    (
        "stage",
        &[
            "approvals",
            "attest",
            "audit",
            "auth",
            "broker",
            "bundle",
            "ca",
            "client",
            "config",
            "dev",
            "entries",
            "federation",
            "notify",
            "policy",
            "signer",
            "store",
            "tls",
            "trust",
        ],
    ),
    ("engine", &["engine"]),
    ("surface", &["http", "workload_api"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

/// Files that only tests compile are not part of the graph.
fn is_test_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    matches!(name, "tests.rs" | "fuzz_tests.rs" | "layering.rs")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its `#[cfg(test)]` tail (test modules sit at
/// the end of a file, by the project's file order).
fn non_test_code(text: &str) -> &str {
    match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    }
}

fn ident_at(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// Top-level modules a piece of code names through `crate::`.
fn imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c, d::{e, f}}`: the first name of each item.
            let mut depth = 0;
            let mut item_start = true;
            for (at, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        out.insert(ident_at(&group[at..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident_at(rest));
        }
    }
    out
}

/// Edges between the library's top-level modules.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known: BTreeSet<&str> = LAYERS.iter().flat_map(|(_, ms)| ms.iter().copied()).collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files.into_iter().filter(|f| !is_test_file(f)) {
        let rel = file.strip_prefix(&src).unwrap_or(&file);
        let first = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        let Some(top) = first.map(|f| f.trim_end_matches(".rs").to_owned()) else {
            continue;
        };
        // The binary's modules (commands, tools, assembly) sit above the library.
        if !known.contains(top.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for target in imports(non_test_code(&text)) {
            if target != top && known.contains(target.as_str()) {
                edges.entry(top.clone()).or_default().insert(target);
            }
        }
    }
    edges
}

/// A cycle through `from`, if there is one.
fn cycle_from(edges: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    fn walk(
        edges: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in edges.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(edges, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![from.to_owned()];
    walk(edges, from, from, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn imports_point_down_and_form_no_cycle() {
    let edges = graph();
    assert!(
        edges.contains_key("engine"),
        "the scan found the engine's imports"
    );
    let mut wrong = Vec::new();
    for (from, targets) in &edges {
        for to in targets {
            let (Some(a), Some(b)) = (layer_of(from), layer_of(to)) else {
                continue;
            };
            if b > a {
                wrong.push(format!("{from} ({}) imports {to} ({})", LAYERS[a].0, LAYERS[b].0));
            }
        }
    }
    assert!(wrong.is_empty(), "imports that point up: {wrong:#?}");
    for module in edges.keys() {
        if let Some(cycle) = cycle_from(&edges, module) {
            panic!("import cycle: {}", cycle.join(" → "));
        }
    }
}

#[test]
fn the_model_and_the_store_stand_alone() {
    let edges = graph();
    let allowed = |module: &str, may: &[&str]| {
        for to in edges.get(module).into_iter().flatten() {
            assert!(may.contains(&to.as_str()), "{module} imports {to}");
        }
    };
    allowed("model", &["util", "spiffe_id"]);
    allowed("util", &[]);
    allowed("store", &["model", "util"]);
    allowed("approvals", &["model", "util"]);
}

#[test]
fn the_scanner_reads_grouped_and_nested_imports() {
    let code = "use crate::{a, b::c, d::{e, f}};\nlet x = crate::g::h();";
    let found: Vec<String> = imports(code).into_iter().collect();
    assert_eq!(found, ["a", "b", "d", "g"]);
    let mut cyclic = BTreeMap::new();
    cyclic.insert("x".to_owned(), BTreeSet::from(["y".to_owned()]));
    cyclic.insert("y".to_owned(), BTreeSet::from(["x".to_owned()]));
    assert_eq!(cycle_from(&cyclic, "x").unwrap(), ["x", "y", "x"]);
}
