//! The workspace's module graphs have no cycle, so that each crate's
//! modules, and its folders at every level, stack the way they import one
//! another. Every crate in `crates/` is read from its source (with `syn`):
//! a module depends on another when it names it or something in it (a
//! `use`, a path in code, a path inside a macro call such as `routes!`);
//! `mod x;` alone is not a dependency. Test modules (`#[cfg(test)]`) are
//! left out: a unit test may reach into its parent.
//!
//! Checked: no cycle between file modules, and none between the children
//! of any module once each child stands for its whole subtree (the
//! gateway's `tenancy` may not use `fleet` if anything under `fleet` uses
//! `tenancy`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// A module by its path from the crate root (`[]` is the root).
type Module = Vec<String>;

struct Crate {
    name: String,
    /// Each module and the modules it depends on.
    edges: BTreeMap<Module, BTreeSet<Module>>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The file of module `name` declared in `file` (a `mod.rs`, `lib.rs`,
/// `main.rs` holds its children beside it; `a.rs` in `a/`).
fn child_file(file: &Path, name: &str) -> Option<PathBuf> {
    let stem = file.file_stem()?.to_str()?;
    let dir = match stem {
        "mod" | "lib" | "main" => file.parent()?.to_path_buf(),
        _ => file.parent()?.join(stem),
    };
    [
        dir.join(format!("{name}.rs")),
        dir.join(name).join("mod.rs"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && matches!(&a.meta, syn::Meta::List(l) if l.tokens.to_string().contains("test"))
    })
}

/// Paths a file names, as written (with `crate`, `super` or `self`, or
/// relative), and the child modules it declares.
#[derive(Default)]
struct Names {
    paths: Vec<Vec<String>>,
    children: Vec<String>,
}

impl<'a> Visit<'a> for Names {
    fn visit_item_mod(&mut self, m: &'a syn::ItemMod) {
        if is_test(&m.attrs) {
            return;
        }
        match &m.content {
            None => self.children.push(m.ident.to_string()),
            // An inline module's names count as its file's.
            Some(_) => syn::visit::visit_item_mod(self, m),
        }
    }

    fn visit_item_fn(&mut self, f: &'a syn::ItemFn) {
        if !is_test(&f.attrs) {
            syn::visit::visit_item_fn(self, f);
        }
    }

    fn visit_item_use(&mut self, u: &'a syn::ItemUse) {
        if !is_test(&u.attrs) {
            use_paths(&u.tree, Vec::new(), &mut self.paths);
        }
    }

    fn visit_path(&mut self, p: &'a syn::Path) {
        self.paths
            .push(p.segments.iter().map(|s| s.ident.to_string()).collect());
        syn::visit::visit_path(self, p);
    }

    /// `pub(crate)` names no dependency.
    fn visit_visibility(&mut self, _: &'a syn::Visibility) {}

    fn visit_macro(&mut self, m: &'a syn::Macro) {
        token_paths(m.tokens.clone(), &mut self.paths);
        syn::visit::visit_macro(self, m);
    }
}

fn use_paths(tree: &syn::UseTree, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let with = |name: String| {
        let mut p = prefix.clone();
        p.push(name);
        p
    };
    match tree {
        syn::UseTree::Path(p) => use_paths(&p.tree, with(p.ident.to_string()), out),
        syn::UseTree::Name(n) => out.push(with(n.ident.to_string())),
        syn::UseTree::Rename(r) => out.push(with(r.ident.to_string())),
        syn::UseTree::Glob(_) => out.push(prefix),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_paths(t, prefix.clone(), out);
            }
        }
    }
}

/// `a::b::c` runs among a macro call's tokens (its arguments are not
/// parsed as Rust).
fn token_paths(tokens: TokenStream, out: &mut Vec<Vec<String>>) {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            TokenTree::Group(g) => token_paths(g.stream(), out),
            TokenTree::Ident(first) => {
                let mut path = vec![first.to_string()];
                while let (
                    Some(TokenTree::Punct(a)),
                    Some(TokenTree::Punct(b)),
                    Some(TokenTree::Ident(next)),
                ) = (tokens.get(i + 1), tokens.get(i + 2), tokens.get(i + 3))
                {
                    if a.as_char() != ':' || b.as_char() != ':' {
                        break;
                    }
                    path.push(next.to_string());
                    i += 3;
                }
                if path.len() > 1 {
                    out.push(path);
                }
            }
            _ => {}
        }
        i += 1;
    }
}

/// Reads the crate whose root file is `root`.
fn read_crate(name: &str, root: &Path) -> Crate {
    let mut files: BTreeMap<Module, (PathBuf, Names)> = BTreeMap::new();
    let mut todo = vec![(Module::new(), root.to_path_buf())];
    while let Some((module, file)) = todo.pop() {
        let text = std::fs::read_to_string(&file).unwrap();
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut names = Names::default();
        names.visit_file(&ast);
        for child in &names.children {
            let path = child_file(&file, child)
                .unwrap_or_else(|| panic!("{}: no file for `mod {child}`", file.display()));
            let mut m = module.clone();
            m.push(child.clone());
            todo.push((m, path));
        }
        files.insert(module, (file, names));
    }
    let modules: BTreeSet<Module> = files.keys().cloned().collect();
    let mut edges = BTreeMap::new();
    for (module, (_, names)) in &files {
        let mut to = BTreeSet::new();
        for path in &names.paths {
            // Where the path starts, as a module path from the root.
            let absolute: Option<Module> = match path.first().map(String::as_str) {
                Some("crate") => Some(path[1..].to_vec()),
                Some("self") => Some([&module[..], &path[1..]].concat()),
                Some("super") => {
                    let ups = path.iter().take_while(|s| *s == "super").count();
                    (ups <= module.len())
                        .then(|| [&module[..module.len() - ups], &path[ups..]].concat())
                }
                Some(first) if names.children.iter().any(|c| c == first) => {
                    Some([&module[..], &path[..]].concat())
                }
                _ => None,
            };
            let Some(absolute) = absolute else { continue };
            // The longest prefix that is a module.
            let target = (0..=absolute.len())
                .rev()
                .map(|n| absolute[..n].to_vec())
                .find(|m| modules.contains(m))
                .expect("the root is a module");
            if &target != module {
                to.insert(target);
            }
        }
        edges.insert(module.clone(), to);
    }
    Crate {
        name: name.to_owned(),
        edges,
    }
}

fn crates() -> Vec<Crate> {
    let dir = workspace().join("crates");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let root = ["src/lib.rs", "src/main.rs"]
            .iter()
            .map(|r| path.join(r))
            .find(|p| p.is_file());
        if let Some(root) = root {
            out.push(read_crate(&name, &root));
        }
    }
    assert!(out.len() >= 7, "read {} crates", out.len());
    out
}

/// The cycles (strongly connected parts of more than one node) of a graph.
fn cycles<N: Ord + Clone>(edges: &BTreeMap<N, BTreeSet<N>>) -> Vec<Vec<N>> {
    // Tarjan's algorithm, recursive: the graphs are small.
    struct State<N> {
        index: BTreeMap<N, usize>,
        low: BTreeMap<N, usize>,
        stack: Vec<N>,
        on_stack: BTreeSet<N>,
        found: Vec<Vec<N>>,
    }
    fn visit<N: Ord + Clone>(n: &N, edges: &BTreeMap<N, BTreeSet<N>>, s: &mut State<N>) {
        let i = s.index.len();
        s.index.insert(n.clone(), i);
        s.low.insert(n.clone(), i);
        s.stack.push(n.clone());
        s.on_stack.insert(n.clone());
        for m in edges.get(n).into_iter().flatten() {
            if !s.index.contains_key(m) {
                visit(m, edges, s);
                let low = s.low[n].min(s.low[m]);
                s.low.insert(n.clone(), low);
            } else if s.on_stack.contains(m) {
                let low = s.low[n].min(s.index[m]);
                s.low.insert(n.clone(), low);
            }
        }
        if s.low[n] == s.index[n] {
            let mut part = Vec::new();
            loop {
                let m = s.stack.pop().expect("n is on the stack");
                s.on_stack.remove(&m);
                part.push(m.clone());
                if &m == n {
                    break;
                }
            }
            if part.len() > 1 {
                s.found.push(part);
            }
        }
    }
    let mut s = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for n in edges.keys() {
        if !s.index.contains_key(n) {
            visit(n, edges, &mut s);
        }
    }
    s.found
}

fn show(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// For every module, the graph of its children, each standing for its
/// subtree: child A depends on child B when anything under A depends on
/// anything under B.
fn sibling_graphs(c: &Crate) -> BTreeMap<Module, BTreeMap<Module, BTreeSet<Module>>> {
    let mut out: BTreeMap<Module, BTreeMap<Module, BTreeSet<Module>>> = BTreeMap::new();
    for (from, tos) in &c.edges {
        for to in tos {
            // The deepest module holding both, and the children of it they lie under.
            let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue; // a module and its own ancestor or descendant
            }
            let parent = from[..common].to_vec();
            let a = from[..=common].to_vec();
            let b = to[..=common].to_vec();
            out.entry(parent)
                .or_default()
                .entry(a)
                .or_default()
                .insert(b);
        }
    }
    out
}

fn problems(c: &Crate) -> Vec<String> {
    let mut out: Vec<String> = cycles(&c.edges)
        .iter()
        .map(|part| {
            let mut names: Vec<String> = part.iter().map(show).collect();
            names.sort();
            format!("{}: modules in a cycle: {}", c.name, names.join(", "))
        })
        .collect();
    for (parent, graph) in sibling_graphs(c) {
        for part in cycles(&graph) {
            let mut names: Vec<String> = part.iter().map(show).collect();
            names.sort();
            out.push(format!(
                "{}: under {}, folders in a cycle: {}",
                c.name,
                show(&parent),
                names.join(", ")
            ));
        }
    }
    out
}

#[test]
fn no_crate_has_a_module_cycle() {
    let all: Vec<String> = crates().iter().flat_map(problems).collect();
    assert!(all.is_empty(), "\n{}", all.join("\n"));
}

#[test]
fn the_check_finds_a_cycle_and_the_gateways_layers_stack() {
    let gateway = crates()
        .into_iter()
        .find(|c| c.name == "strata-gateway")
        .unwrap();
    let m = |s: &str| s.split("::").map(str::to_owned).collect::<Module>();
    // What the gateway's source says: the relay uses the fleet, the API the relay.
    assert!(gateway.edges[&m("relay::forward")].contains(&m("fleet::replicas")));
    assert!(gateway.edges[&m("api::generate")].contains(&m("relay::passthrough")));
    // Found from a macro's tokens (`routes!(generate::completions)`).
    assert!(gateway.edges[&m("api")].contains(&m("api::generate")));
    // One edge back, from the fleet to the API, closes a cycle of folders.
    let mut broken = Crate {
        name: "broken".into(),
        edges: gateway.edges.clone(),
    };
    broken
        .edges
        .get_mut(&m("fleet::replicas"))
        .unwrap()
        .insert(m("api::generate"));
    let found = problems(&broken);
    assert!(
        found
            .iter()
            .any(|p| p.contains("folders in a cycle") && p.contains("api") && p.contains("fleet")),
        "{found:?}"
    );
}
