//! The README is the front door and docs/ the reference: the README stays short, every
//! relative link in either resolves, its feature matrix is the capability table, and the recipe
//! reference is what `furnace recipe explain` prints today (`FURNACE_BLESS=1` rewrites both
//! after a change).

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|entry| entry.expect("readable docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The targets of a page's Markdown links `[text](target)`, outside code blocks.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            targets.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    targets
}

/// `#anchor` of a heading, as GitHub writes it.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix('#')).map(|l| anchor(l.trim_start_matches('#'))).collect()
}

#[test]
fn readme_is_short() {
    let size = std::fs::metadata(root().join("README.md")).expect("README.md").len();
    assert!(size <= 10 * 1024, "README.md is {size} bytes; keep it under 10 KB and move reference material to docs/");
}

#[test]
fn every_link_resolves() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).expect("readable page");
        for target in link_targets(&text) {
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (path, fragment) = target.split_once('#').unwrap_or((&target, ""));
            let file = if path.is_empty() { page.clone() } else { page.parent().expect("page folder").join(path) };
            if !file.exists() {
                broken.push(format!("{}: {target} (no file {})", page.display(), file.display()));
            } else if !fragment.is_empty() {
                let linked = std::fs::read_to_string(&file).unwrap_or_default();
                if !anchors(&linked).iter().any(|a| a == fragment) {
                    broken.push(format!("{}: {target} (no heading #{fragment})", page.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn recipe_reference_is_current() {
    let path = root().join("docs/recipe-reference.md");
    let expected = format!(
        "# Recipe reference\n\nEvery section and option of a recipe, its default, type and meaning, as `furnace recipe explain` prints it\n(generated from the schema in `configs/src/recipe.rs` and, for `[model]`, each architecture's file in `core/src/arch/`;\ndo not edit by hand).\n\n```toml\n{}```\n",
        furnace_configs::explain()
    );
    if std::env::var("FURNACE_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &expected).expect("write docs/recipe-reference.md");
    }
    let found = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        found == expected,
        "docs/recipe-reference.md differs from `furnace recipe explain`; regenerate it with FURNACE_BLESS=1 cargo test -p furnace-trainer --test docs"
    );
}

#[test]
fn the_feature_matrix_is_the_capability_table() {
    let path = root().join("README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let (start, end) = ("<!-- capabilities:start -->\n", "<!-- capabilities:end -->");
    let (before, rest) = readme.split_once(start).expect("the README marks where the matrix goes");
    let (found, after) = rest.split_once(end).expect("the matrix's end marker");
    let matrix = furnace_configs::capabilities::capability_matrix();
    if std::env::var("FURNACE_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, format!("{before}{start}{matrix}{end}{after}")).expect("write README.md");
    } else {
        assert!(
            found == matrix,
            "README.md's feature matrix differs from configs/src/capabilities.rs; regenerate it with FURNACE_BLESS=1 cargo test -p furnace-trainer --test docs"
        );
    }
}

#[test]
fn link_targets_are_found() {
    let targets = link_targets("see [a](docs/a.md) and [b](#b-c)\n```\n[no](x)\n```\n");
    assert_eq!(targets, ["docs/a.md", "#b-c"]);
    assert_eq!(anchor(" Memory and precision"), "memory-and-precision");
}
