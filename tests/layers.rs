//! The library's layers, checked: every `crate::` path in a module names a module of a lower
//! layer. A new module must be given its layer here; an import that points up (or sideways within
//! a layer) fails this test with the file and line.

use std::path::Path;

/// Bottom first. A module may use modules of strictly lower layers only.
const LAYERS: &[&[&str]] = &[
    &["normalize"],
    &["config", "metrics", "tickets"],
    &[
        "error",
        "tls",
        "headers",
        "watch",
        "io",
        "proxyproto",
        "ratelimit",
        "auth",
    ],
    &["body"],
    &["upstream"],
    &["routing"],
    &["state"],
    &["reload", "proxy", "admin"],
    &["server"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Every module named after `crate::` in `text`, with its line: `crate::a::b`, and each top-level
/// name inside `crate::{a::x, b}`.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        out.push((i + 1, name));
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                out.push((i + 1, name));
            }
        }
    }
    out
}

/// Every source file with the module it belongs to: `src/NAME.rs`, and each `src/NAME/*.rs` of a
/// module kept as a folder (the folder is one module: its files may use each other).
fn module_files(src: &Path) -> Vec<(String, std::path::PathBuf)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path
            .file_name()
            .and_then(|s| s.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if path.is_dir() {
            // Sub-folders too (`config/diff/`): they belong to the same module.
            let mut dirs = vec![path];
            while let Some(dir) = dirs.pop() {
                for inner in std::fs::read_dir(&dir).unwrap() {
                    let file = inner.unwrap().path();
                    if file.is_dir() {
                        dirs.push(file);
                    } else if file.extension().is_some_and(|e| e == "rs") {
                        out.push((name.clone(), file));
                    }
                }
            }
        } else if let Some(module) = name.strip_suffix(".rs") {
            if module != "lib" && module != "main" {
                out.push((module.to_string(), path));
            }
        }
    }
    out
}

#[test]
fn imports_point_down_the_layers_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut problems = Vec::new();
    let mut seen = Vec::new();
    for (module, path) in module_files(&src) {
        let shown = path
            .strip_prefix(&src)
            .unwrap_or(&path)
            .display()
            .to_string();
        seen.push(module.clone());
        let Some(own) = layer_of(&module) else {
            problems.push(format!(
                "src/{shown}: give the module {module} a layer in tests/layers.rs"
            ));
            continue;
        };
        let text = std::fs::read_to_string(&path).unwrap();
        for (line, used) in crate_paths(&text) {
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l < own => {}
                Some(l) => problems.push(format!(
                    "src/{shown}:{line}: uses crate::{used} (layer {l}) from layer {own}: imports must point down"
                )),
                None => problems.push(format!(
                    "src/{shown}:{line}: uses crate::{used}, which has no layer"
                )),
            }
        }
    }
    for layer in LAYERS {
        for m in *layer {
            if !seen.iter().any(|s| s == m) {
                problems.push(format!("tests/layers.rs names {m}, which is not in src/"));
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn the_checker_sees_both_path_forms() {
    let found = crate_paths(
        "use crate::config::Config;\nuse crate::{tls::X, routing};\n// crate::server\n",
    );
    assert_eq!(
        found,
        vec![
            (1, "config".to_string()),
            (2, "tls".to_string()),
            (2, "routing".to_string())
        ]
    );
}
