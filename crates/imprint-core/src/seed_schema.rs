//! Host-side seed checks (cargo feature `seed-schema`, on in the `imprint` CLI, off in the PID-1
//! appliance): the seed templates are parsed as YAML the way cloud-init reads them (PyYAML's
//! YAML 1.1 `safe_load`: `yes`/`on` are booleans, `0644` is octal, `1e5` is a string) and
//! checked — user-data against cloud-init's published JSON schema, network-config against the
//! version 1/2 shape, meta-data for being a mapping — so a seed mistake is found at the desk,
//! as `file:line:column: key path: what is wrong`, not at a machine nobody can log into.
//!
//! The schema is `schemas/schema-cloud-config-v1.json` from cloud-init
//! [`CLOUD_CONFIG_SCHEMA_VERSION`], used under the Apache-2.0 licence (cloud-init is dual
//! GPLv3/Apache-2.0; see `schemas/README.md`).
//!
//! Messages never quote a value from the file (user-data holds password hashes and keys): they
//! name the place, the key path and the rule, and key names are escaped.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::OnceLock;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::ValidationError;
use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span, StrInput, Tag};
use serde_json::{Map, Number, Value};

use crate::seed::SeedProblem;

/// cloud-init's JSON schema for `#cloud-config` user-data, shipped as data.
const CLOUD_CONFIG_SCHEMA: &str = include_str!("../schemas/schema-cloud-config-v1.json");

/// Where [`CLOUD_CONFIG_SCHEMA`] comes from.
pub const CLOUD_CONFIG_SCHEMA_VERSION: &str = "cloud-init 22.4.2 (Debian package 22.4.2-1+deb12u4)";

/// Where a node of the document is, and how to name it.
#[derive(Debug, Clone)]
struct Place {
    /// 1-based line and column of the value.
    at: (usize, usize),
    /// 1-based line and column of the mapping key naming the value, if any.
    key_at: Option<(usize, usize)>,
    /// `users[0].lock_passwd`.
    display: String,
}

/// A YAML document converted to JSON, with the place of every node (keyed by JSON pointer).
#[derive(Debug)]
pub(crate) struct Document {
    /// The value as cloud-init's loader would see it.
    pub(crate) value: Value,
    places: HashMap<String, Place>,
}

impl Document {
    /// The place of `pointer`, or of its nearest ancestor that has one.
    fn place(&self, pointer: &str) -> Place {
        let mut p = pointer;
        loop {
            if let Some(place) = self.places.get(p) {
                return place.clone();
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => {
                    return Place {
                        at: (1, 1),
                        key_at: None,
                        display: String::new(),
                    }
                }
            }
        }
    }
}

/// Escapes a key for a JSON pointer segment (RFC 6901).
fn pointer_segment(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// A key as shown to the user: no control characters from the file reach the terminal.
fn shown(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '@' | '+' | '<'))
    {
        key.to_string()
    } else {
        format!("{:?}", key)
    }
}

fn mark(span: &Span) -> (usize, usize) {
    (span.start.line(), span.start.col() + 1)
}

struct Loader<'a, 'p> {
    parser: Parser<'a, StrInput<'a>>,
    file: &'p Path,
    anchors: HashMap<usize, Value>,
    places: HashMap<String, Place>,
    /// Problems that do not stop the parse (duplicate keys).
    problems: Vec<SeedProblem>,
    /// Last position seen, for an error at the end of the input.
    last: (usize, usize),
}

impl<'a> Loader<'a, '_> {
    fn problem(&self, at: (usize, usize), key_path: &str, message: String) -> SeedProblem {
        SeedProblem {
            path: self.file.to_path_buf(),
            line: at.0,
            column: at.1,
            key_path: key_path.to_string(),
            message,
        }
    }

    fn scan_error(&self, e: &ScanError) -> SeedProblem {
        let m = e.marker();
        self.problem(
            (m.line(), m.col() + 1),
            "",
            format!("not valid YAML: {}", e.info()),
        )
    }

    fn next(&mut self) -> Result<(Event<'a>, Span), SeedProblem> {
        match self.parser.next_event() {
            Some(Ok((ev, span))) => {
                self.last = mark(&span);
                Ok((ev, span))
            }
            Some(Err(e)) => Err(self.scan_error(&e)),
            None => Err(self.problem(self.last, "", "unexpected end of the YAML".into())),
        }
    }

    /// Builds the node that starts with `ev`.
    fn node(
        &mut self,
        ev: Event<'a>,
        span: Span,
        pointer: &str,
        display: &str,
        key_at: Option<(usize, usize)>,
    ) -> Result<Value, SeedProblem> {
        let at = mark(&span);
        self.places.insert(
            pointer.to_string(),
            Place {
                at,
                key_at,
                display: display.to_string(),
            },
        );
        let (value, anchor) = match ev {
            Event::Scalar(text, style, anchor, tag) => {
                (resolve_scalar(&text, style, tag.as_deref()), anchor)
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                Some(v) => (v.clone(), 0),
                None => return Err(self.problem(at, display, "unknown alias".into())),
            },
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (ev, span) = self.next()?;
                    if matches!(ev, Event::SequenceEnd) {
                        break;
                    }
                    let i = items.len();
                    let item = self.node(
                        ev,
                        span,
                        &format!("{pointer}/{i}"),
                        &format!("{display}[{i}]"),
                        None,
                    )?;
                    items.push(item);
                }
                (Value::Array(items), anchor)
            }
            Event::MappingStart(anchor, _) => (self.mapping(pointer, display)?, anchor),
            _ => return Err(self.problem(at, display, "unexpected YAML event".into())),
        };
        if anchor > 0 {
            self.anchors.insert(anchor, value.clone());
        }
        Ok(value)
    }

    fn mapping(&mut self, pointer: &str, display: &str) -> Result<Value, SeedProblem> {
        let mut map = Map::new();
        let mut first_seen: HashMap<String, usize> = HashMap::new();
        let mut merges = Vec::new();
        loop {
            let (ev, span) = self.next()?;
            let key_at = mark(&span);
            let (key, merge) = match ev {
                Event::MappingEnd => break,
                Event::Scalar(text, style, _, _) => {
                    let merge = style == ScalarStyle::Plain && text == "<<";
                    (text.into_owned(), merge)
                }
                Event::Alias(id) => match self.anchors.get(&id) {
                    Some(Value::String(s)) => (s.clone(), false),
                    _ => {
                        return Err(self.problem(
                            key_at,
                            display,
                            "a mapping key must be text".into(),
                        ))
                    }
                },
                _ => {
                    return Err(self.problem(
                        key_at,
                        display,
                        "a mapping key must be text (cloud-init cannot use a list or mapping \
                         as a key)"
                            .into(),
                    ))
                }
            };
            let child_display = if display.is_empty() {
                shown(&key)
            } else {
                format!("{display}.{}", shown(&key))
            };
            let child_pointer = format!("{pointer}/{}", pointer_segment(&key));
            let (ev, span) = self.next()?;
            let value = self.node(ev, span, &child_pointer, &child_display, Some(key_at))?;
            if merge {
                merges.push(value);
                continue;
            }
            if let Some(first) = first_seen.get(&key) {
                let p = self.problem(
                    key_at,
                    &child_display,
                    format!(
                        "given twice (first on line {first}); cloud-init keeps only the last, \
                         so the first is lost"
                    ),
                );
                self.problems.push(p);
            } else {
                first_seen.insert(key.clone(), key_at.0);
            }
            map.insert(key, value);
        }
        // YAML merge keys (`<<: *defaults`), as PyYAML does: keys given here win.
        for m in merges {
            let sources = match m {
                Value::Array(a) => a,
                other => vec![other],
            };
            for s in sources {
                if let Value::Object(o) = s {
                    for (k, v) in o {
                        map.entry(k).or_insert(v);
                    }
                }
            }
        }
        Ok(Value::Object(map))
    }
}

/// Parses `text` (one YAML document) as cloud-init's PyYAML `safe_load` would. The first
/// error stops the parse; duplicate keys are collected and parsing goes on.
pub(crate) fn load_yaml(file: &Path, text: &str) -> Result<Document, Vec<SeedProblem>> {
    let mut l = Loader {
        parser: Parser::new_from_str(text),
        file,
        anchors: HashMap::new(),
        places: HashMap::new(),
        problems: Vec::new(),
        last: (1, 1),
    };
    let mut value = Value::Null;
    let mut documents = 0;
    let res = (|| -> Result<(), SeedProblem> {
        loop {
            let (ev, span) = l.next()?;
            match ev {
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::StreamEnd => return Ok(()),
                Event::DocumentStart(_) => {
                    documents += 1;
                    if documents > 1 {
                        return Err(l.problem(
                            mark(&span),
                            "",
                            "a second YAML document (`---`): cloud-init reads exactly one".into(),
                        ));
                    }
                }
                ev => value = l.node(ev, span, "", "", None)?,
            }
        }
    })();
    let mut problems = std::mem::take(&mut l.problems);
    if let Err(p) = res {
        problems.push(p);
    }
    if problems.is_empty() {
        Ok(Document {
            value,
            places: l.places,
        })
    } else {
        Err(problems)
    }
}

/// Resolves a scalar like PyYAML's `SafeLoader` (YAML 1.1 implicit types).
fn resolve_scalar(text: &str, style: ScalarStyle, tag: Option<&Tag>) -> Value {
    if let Some(tag) = tag {
        let core = tag.handle == "tag:yaml.org,2002:" || tag.handle == "!!";
        let typed = match (core, tag.suffix.as_str()) {
            (true, "str") => Some(Value::String(text.to_string())),
            (true, "int") => yaml11_int(text),
            (true, "float") => yaml11_float(text).or_else(|| yaml11_int(text)),
            (true, "bool") => yaml11_bool(text).map(Value::Bool),
            (true, "null") => Some(Value::Null),
            _ => None,
        };
        return typed.unwrap_or_else(|| Value::String(text.to_string()));
    }
    if style != ScalarStyle::Plain {
        return Value::String(text.to_string());
    }
    if matches!(text, "" | "~" | "null" | "Null" | "NULL") {
        return Value::Null;
    }
    if let Some(b) = yaml11_bool(text) {
        return Value::Bool(b);
    }
    yaml11_int(text)
        .or_else(|| yaml11_float(text))
        .unwrap_or_else(|| Value::String(text.to_string()))
}

fn yaml11_bool(text: &str) -> Option<bool> {
    match text {
        "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => Some(true),
        "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

/// PyYAML's int: `0b1010`, `0755` (octal), `0x1f`, `1_000`, `190:20:30` (base 60).
fn yaml11_int(text: &str) -> Option<Value> {
    let (neg, body) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let digits = |s: &str, ok: fn(char) -> bool| !s.is_empty() && s.chars().all(ok);
    let clean = |s: &str| s.replace('_', "");
    let magnitude: i128 = if let Some(b) = body.strip_prefix("0b") {
        if !digits(b, |c| matches!(c, '0' | '1' | '_')) {
            return None;
        }
        i128::from_str_radix(&clean(b), 2).ok()?
    } else if let Some(h) = body.strip_prefix("0x") {
        if !digits(h, |c| c.is_ascii_hexdigit() || c == '_') {
            return None;
        }
        i128::from_str_radix(&clean(h), 16).ok()?
    } else if body == "0" {
        0
    } else if let Some(o) = body.strip_prefix('0') {
        if !digits(o, |c| matches!(c, '0'..='7' | '_')) {
            return None;
        }
        i128::from_str_radix(&clean(o), 8).ok()?
    } else if body.starts_with(|c: char| matches!(c, '1'..='9')) {
        let mut parts = body.split(':');
        let head = parts.next()?;
        if !digits(head, |c| c.is_ascii_digit() || c == '_') {
            return None;
        }
        let mut n: i128 = clean(head).parse().ok()?;
        for part in parts {
            let ok = matches!(part.len(), 1 | 2)
                && part.chars().all(|c| c.is_ascii_digit())
                && (part.len() == 1 || part.starts_with(|c| matches!(c, '0'..='5')));
            if !ok {
                return None;
            }
            n = n.checked_mul(60)?.checked_add(part.parse().ok()?)?;
        }
        n
    } else {
        return None;
    };
    let n = if neg { -magnitude } else { magnitude };
    i64::try_from(n)
        .map(|n| Value::Number(n.into()))
        .or_else(|_| u64::try_from(n).map(|n| Value::Number(n.into())))
        .ok()
        .or_else(|| Number::from_f64(n as f64).map(Value::Number))
}

/// PyYAML's float: `1.5`, `-2.`, `.5`, `1.0e+3` (the exponent needs a sign: `1e5` is text).
/// Infinity and NaN have no JSON form and stay text.
fn yaml11_float(text: &str) -> Option<Value> {
    let (signed, body) = match text.as_bytes().first()? {
        b'-' | b'+' => (true, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    if let Some(e) = exponent {
        let digits = e.strip_prefix(['+', '-'])?;
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
    }
    let (int, frac) = mantissa.split_once('.')?;
    let num_ = |s: &str| s.chars().all(|c| c.is_ascii_digit() || c == '_');
    let ok = if int.is_empty() {
        // `.5`: no sign allowed, a digit first.
        !signed && frac.starts_with(|c: char| c.is_ascii_digit()) && num_(frac)
    } else {
        int.starts_with(|c: char| c.is_ascii_digit()) && num_(int) && num_(frac)
    };
    if !ok {
        return None;
    }
    let f: f64 = text.replace('_', "").trim_end_matches('.').parse().ok()?;
    Number::from_f64(f).map(Value::Number)
}

fn validator() -> Result<&'static jsonschema::Validator, String> {
    static V: OnceLock<Result<jsonschema::Validator, String>> = OnceLock::new();
    V.get_or_init(|| {
        let schema: Value = serde_json::from_str(CLOUD_CONFIG_SCHEMA)
            .map_err(|e| format!("the shipped cloud-init schema is not JSON: {e}"))?;
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .map_err(|e| format!("the shipped cloud-init schema does not compile: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The top-level keys cloud-init's modules know (the `properties` of every module schema
/// the top-level `allOf` names).
fn known_top_level_keys() -> BTreeSet<String> {
    let Ok(schema) = serde_json::from_str::<Value>(CLOUD_CONFIG_SCHEMA) else {
        return BTreeSet::new();
    };
    let mut keys = BTreeSet::new();
    for r in schema["allOf"].as_array().into_iter().flatten() {
        let Some(name) = r["$ref"].as_str().and_then(|s| s.strip_prefix("#/$defs/")) else {
            continue;
        };
        if let Some(props) = schema["$defs"][name]["properties"].as_object() {
            keys.extend(props.keys().cloned());
        }
    }
    keys
}

/// Levenshtein distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null (nothing)",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn list(v: &Value) -> String {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

/// One schema error as problems; never quotes the instance's value.
fn describe(doc: &Document, file: &Path, e: &ValidationError<'_>, out: &mut Vec<SeedProblem>) {
    let pointer = e.instance_path().as_str().to_string();
    let place = doc.place(&pointer);
    let instance = doc.value.pointer(&pointer).unwrap_or(&Value::Null);
    let push = |out: &mut Vec<SeedProblem>, at: (usize, usize), key_path: String, m: String| {
        out.push(SeedProblem {
            path: file.to_path_buf(),
            line: at.0,
            column: at.1,
            key_path,
            message: m,
        });
    };
    let message = match e.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected }
        | ValidationErrorKind::UnevaluatedProperties { unexpected } => {
            for key in unexpected {
                let child = doc.place(&format!("{pointer}/{}", pointer_segment(key)));
                let at = child.key_at.unwrap_or(child.at);
                push(
                    out,
                    at,
                    child.display,
                    "unknown key here: cloud-init's schema does not allow it".into(),
                );
            }
            return;
        }
        ValidationErrorKind::Type { kind } => {
            let want = match kind {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(set) => set
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            format!("expected {want}, found {}", json_type(instance))
        }
        ValidationErrorKind::Enum { options } => format!("must be one of {}", list(options)),
        ValidationErrorKind::Constant { expected_value } => {
            format!("must be {expected_value}")
        }
        ValidationErrorKind::Required { property } => {
            format!("missing the required key {property}")
        }
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context } => {
            // The branch that got deepest into the value says most about the mistake.
            let best = context
                .iter()
                .filter(|branch| !branch.is_empty())
                .max_by_key(|branch| {
                    branch
                        .iter()
                        .map(|e| e.instance_path().as_str().len())
                        .min()
                        .unwrap_or(0)
                });
            if let Some(branch) = best {
                if branch
                    .iter()
                    .all(|b| b.instance_path().as_str().len() > pointer.len())
                {
                    for b in branch {
                        describe(doc, file, b, out);
                    }
                    return;
                }
            }
            format!(
                "{} does not fit any form cloud-init accepts here",
                json_type(instance)
            )
        }
        ValidationErrorKind::OneOfMultipleValid { .. } => {
            "fits more than one form cloud-init accepts here: make it unambiguous".into()
        }
        ValidationErrorKind::Pattern { pattern } => {
            format!("does not match the pattern {pattern:?}")
        }
        ValidationErrorKind::Format { format } => format!("is not a valid {format}"),
        ValidationErrorKind::MinItems { limit } => format!("needs at least {limit} item(s)"),
        ValidationErrorKind::MaxItems { limit } => format!("allows at most {limit} item(s)"),
        ValidationErrorKind::MinLength { limit } => format!("needs at least {limit} character(s)"),
        ValidationErrorKind::MaxLength { limit } => {
            format!("allows at most {limit} character(s)")
        }
        ValidationErrorKind::MinProperties { limit } => format!("needs at least {limit} key(s)"),
        ValidationErrorKind::MaxProperties { limit } => format!("allows at most {limit} key(s)"),
        ValidationErrorKind::Minimum { limit } => format!("must be at least {limit}"),
        ValidationErrorKind::Maximum { limit } => format!("must be at most {limit}"),
        ValidationErrorKind::ExclusiveMinimum { limit } => format!("must be more than {limit}"),
        ValidationErrorKind::ExclusiveMaximum { limit } => format!("must be less than {limit}"),
        ValidationErrorKind::UniqueItems => "items must be unique".into(),
        ValidationErrorKind::Not { .. } | ValidationErrorKind::FalseSchema => {
            "not allowed here".into()
        }
        _ => format!(
            "does not satisfy cloud-init's schema (rule {})",
            e.schema_path()
        ),
    };
    push(out, place.at, place.display, message);
}

/// Checks `#cloud-config` user-data: YAML syntax, a mapping at the top, cloud-init's schema,
/// and top-level keys that look like a misspelt module key.
pub(crate) fn check_cloud_config(file: &Path, text: &str) -> Vec<SeedProblem> {
    // `#cloud-config-archive` (a list of parts) and other `#cloud-config…` headers are not a
    // cloud-config mapping: only the exact header is checked against the schema.
    if text.lines().next().map(str::trim_end) != Some("#cloud-config") {
        return Vec::new();
    }
    let doc = match load_yaml(file, text) {
        Ok(d) => d,
        Err(problems) => return problems,
    };
    let mut out = Vec::new();
    match &doc.value {
        Value::Null => return out, // only the header: cloud-init treats it as `{}`
        Value::Object(_) => {}
        other => {
            let p = doc.place("");
            out.push(SeedProblem {
                path: file.to_path_buf(),
                line: p.at.0,
                column: p.at.1,
                key_path: String::new(),
                message: format!(
                    "the cloud-config is {}; cloud-init needs a mapping of keys (`users:`, \
                     `runcmd:` …)",
                    json_type(other)
                ),
            });
            return out;
        }
    }
    match validator() {
        Ok(v) => {
            for e in v.iter_errors(&doc.value) {
                describe(&doc, file, &e, &mut out);
            }
        }
        Err(reason) => out.push(SeedProblem {
            path: file.to_path_buf(),
            line: 1,
            column: 1,
            key_path: String::new(),
            message: reason,
        }),
    }
    let known = known_top_level_keys();
    if let Value::Object(top) = &doc.value {
        for key in top.keys() {
            if known.contains(key) {
                continue;
            }
            let near = known
                .iter()
                .filter(|k| distance(k, key) <= 2.min(key.len() / 3 + 1))
                .min_by_key(|k| distance(k, key));
            if let Some(near) = near {
                let p = doc.place(&format!("/{}", pointer_segment(key)));
                out.push(SeedProblem {
                    path: file.to_path_buf(),
                    line: p.key_at.unwrap_or(p.at).0,
                    column: p.key_at.unwrap_or(p.at).1,
                    key_path: p.display,
                    message: format!(
                        "no cloud-init module reads this key (it would be ignored): did you \
                         mean {near}?"
                    ),
                });
            }
        }
    }
    out.sort_by_key(|p| (p.line, p.column));
    out.dedup();
    out
}

/// Checks network-config: YAML, `version` 1 or 2 (optionally under `network:`), and the
/// shape of that version.
pub(crate) fn check_network_config(file: &Path, text: &str) -> Vec<SeedProblem> {
    let doc = match load_yaml(file, text) {
        Ok(d) => d,
        Err(problems) => return problems,
    };
    let mut out = Vec::new();
    let mut bad = |pointer: &str, key: bool, message: String| {
        let p = doc.place(pointer);
        let at = if key { p.key_at.unwrap_or(p.at) } else { p.at };
        out.push(SeedProblem {
            path: file.to_path_buf(),
            line: at.0,
            column: at.1,
            key_path: p.display,
            message,
        });
    };
    let (base, net) = match doc.value.get("network") {
        Some(n) => ("/network", n),
        None => ("", &doc.value),
    };
    let Some(map) = net.as_object() else {
        bad(
            base,
            false,
            format!("network-config is {}; it must be a mapping", json_type(net)),
        );
        return out;
    };
    match map.get("version").map(|v| (v, v.as_u64())) {
        None => bad(
            base,
            false,
            "no `version` key: a cloud-init network-config needs `version: 1` or `version: 2`"
                .into(),
        ),
        Some((_, Some(1))) => {
            const TYPES: &[&str] = &[
                "physical",
                "bond",
                "bridge",
                "vlan",
                "nameserver",
                "route",
                "infiniband",
            ];
            match map.get("config") {
                Some(Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        let ptr = format!("{base}/config/{i}");
                        match item.get("type").and_then(Value::as_str) {
                            Some(t) if TYPES.contains(&t) => {
                                if t != "nameserver" && t != "route" && item.get("name").is_none() {
                                    bad(&ptr, false, format!("a {t} entry needs `name`"));
                                }
                            }
                            Some(_) => bad(
                                &format!("{ptr}/type"),
                                false,
                                format!("unknown type; version 1 knows {}", TYPES.join(", ")),
                            ),
                            None => bad(&ptr, false, "needs `type` (physical, bond …)".into()),
                        }
                    }
                }
                Some(other) => bad(
                    &format!("{base}/config"),
                    false,
                    format!("expected a list of interfaces, found {}", json_type(other)),
                ),
                None => bad(base, false, "version 1 needs a `config:` list".into()),
            }
        }
        Some((_, Some(2))) => {
            const SECTIONS: &[&str] = &[
                "ethernets",
                "wifis",
                "bonds",
                "bridges",
                "vlans",
                "tunnels",
                "vrfs",
                "modems",
            ];
            for (key, v) in map {
                let ptr = format!("{base}/{}", pointer_segment(key));
                if key == "version" || key == "renderer" {
                    continue;
                }
                if !SECTIONS.contains(&key.as_str()) {
                    bad(
                        &ptr,
                        true,
                        format!(
                            "unknown key in a version 2 network-config (known: version, \
                             renderer, {})",
                            SECTIONS.join(", ")
                        ),
                    );
                    continue;
                }
                match v {
                    Value::Object(devices) => {
                        for (name, dev) in devices {
                            if !dev.is_object() {
                                bad(
                                    &format!("{ptr}/{}", pointer_segment(name)),
                                    false,
                                    format!(
                                        "expected a mapping of settings, found {}",
                                        json_type(dev)
                                    ),
                                );
                            }
                        }
                    }
                    Value::Null => {}
                    other => bad(
                        &ptr,
                        false,
                        format!(
                            "expected a mapping of device names, found {}",
                            json_type(other)
                        ),
                    ),
                }
            }
        }
        Some(_) => bad(
            &format!("{base}/version"),
            false,
            "`version` must be 1 or 2".into(),
        ),
    }
    out
}

/// Checks meta-data: YAML (or JSON) that is a mapping, with text `instance-id` and
/// `local-hostname`.
pub(crate) fn check_meta_data(file: &Path, text: &str) -> Vec<SeedProblem> {
    let doc = match load_yaml(file, text) {
        Ok(d) => d,
        Err(problems) => return problems,
    };
    let mut out = Vec::new();
    let mut bad = |pointer: &str, message: String| {
        let p = doc.place(pointer);
        out.push(SeedProblem {
            path: file.to_path_buf(),
            line: p.at.0,
            column: p.at.1,
            key_path: p.display,
            message,
        });
    };
    match &doc.value {
        Value::Null => {}
        Value::Object(m) => {
            for key in ["instance-id", "local-hostname"] {
                if let Some(v) = m.get(key) {
                    if !v.is_string() && !v.is_number() {
                        bad(
                            &format!("/{key}"),
                            format!("expected text, found {}", json_type(v)),
                        );
                    }
                }
            }
        }
        other => bad(
            "",
            format!(
                "meta-data is {}; it must be a mapping (`key: value` lines or a JSON object)",
                json_type(other)
            ),
        ),
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn f() -> &'static Path {
        Path::new("seed/user-data")
    }

    /// The problems as the user sees them.
    fn cc(text: &str) -> Vec<String> {
        check_cloud_config(f(), text)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn yaml_1_1_scalars_as_pyyaml_reads_them() {
        let d = load_yaml(
            f(),
            "a: yes\nb: off\nc: 0644\nd: 0x1f\ne: 1_000\nf: 1e5\ng: 1.5e+3\nh: ~\ni: '0644'\n\
             j: 190:20:30\nk: .5\nl: 0b101\nm: !!str 12\nn: 2.\no: 08\np: -12\n",
        )
        .unwrap();
        let v = &d.value;
        assert_eq!(v["a"], true);
        assert_eq!(v["b"], false);
        assert_eq!(v["c"], 420);
        assert_eq!(v["d"], 31);
        assert_eq!(v["e"], 1000);
        assert_eq!(v["f"], "1e5");
        assert_eq!(v["g"], 1500.0);
        assert_eq!(v["h"], Value::Null);
        assert_eq!(v["i"], "0644");
        assert_eq!(v["j"], 685_230);
        assert_eq!(v["k"], 0.5);
        assert_eq!(v["l"], 5);
        assert_eq!(v["m"], "12");
        assert_eq!(v["n"], 2.0);
        assert_eq!(v["o"], "08");
        assert_eq!(v["p"], -12);
    }

    #[test]
    fn anchors_aliases_and_merge_keys() {
        let d = load_yaml(
            f(),
            "base: &b {shell: /bin/bash, sudo: x}\nu:\n  <<: *b\n  sudo: y\nl: [*b]\n",
        )
        .unwrap();
        assert_eq!(d.value["u"]["shell"], "/bin/bash");
        assert_eq!(d.value["u"]["sudo"], "y");
        assert_eq!(d.value["l"][0]["sudo"], "x");
    }

    #[test]
    fn a_valid_cloud_config_passes() {
        let ok = "#cloud-config\nhostname: nuc\nssh_pwauth: no\nusers:\n  - name: ops\n    \
                  lock_passwd: true\n    groups: [sudo]\n    ssh_authorized_keys:\n      - \
                  ssh-ed25519 AAAA\nwrite_files:\n  - path: /etc/x\n    permissions: '0644'\n    \
                  content: hi\nruncmd:\n  - [sh, -c, 'echo hi']\n  - echo there\npackages: [vim]\n";
        assert_eq!(cc(ok), Vec::<String>::new());
        assert_eq!(cc("#cloud-config\n"), Vec::<String>::new());
        assert_eq!(cc("#cloud-config\n{}\n"), Vec::<String>::new());
        assert_eq!(
            cc("#cloud-config-archive\n- type: text/cloud-config\n  content: x\n"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn broken_yaml_names_line_and_column() {
        assert_eq!(
            cc("#cloud-config\nusers:\n  - name: ops\n   groups: sudo\n"),
            ["seed/user-data:4:4: not valid YAML: while parsing a block collection, did not find expected '-' indicator"]
        );
        assert_eq!(
            cc("#cloud-config\nruncmd:\n\t- ls\n"),
            ["seed/user-data:3:2: not valid YAML: tabs disallowed within this context (block indentation)"]
        );
        assert_eq!(
            cc("#cloud-config\nruncmd: [ls\n"),
            ["seed/user-data:3:1: not valid YAML: while parsing a flow sequence, expected ',' or ']'"]
        );
    }

    #[test]
    fn schema_errors_name_the_key_path() {
        // A type error on a nested value: the value's own place.
        assert_eq!(
            cc("#cloud-config\nusers:\n  - name: ops\n    lock_passwd: [x]\n"),
            ["seed/user-data:4:18: users[0].lock_passwd: expected boolean, found a list"]
        );
        // An unknown key inside a module's mapping: the key's place.
        assert_eq!(
            cc("#cloud-config\npower_state:\n  mode: reboot\n  delai: now\n"),
            ["seed/user-data:4:3: power_state.delai: unknown key here: cloud-init's schema does not allow it"]
        );
        // An enum.
        assert_eq!(
            cc("#cloud-config\npower_state:\n  mode: restart\n"),
            ["seed/user-data:3:9: power_state.mode: must be one of \"poweroff\", \"reboot\", \"halt\""]
        );
        // A misspelt top-level key: ignored by cloud-init, so refused here.
        assert_eq!(
            cc("#cloud-config\nssh_authorised_keys: [k]\n"),
            ["seed/user-data:2:1: ssh_authorised_keys: no cloud-init module reads this key (it would be ignored): did you mean ssh_authorized_keys?"]
        );
    }

    #[test]
    fn duplicate_keys_second_document_and_top_level_type() {
        assert_eq!(
            cc("#cloud-config\nruncmd: [a]\npackages: [b]\nruncmd: [c]\n"),
            ["seed/user-data:4:1: runcmd: given twice (first on line 2); cloud-init keeps only the last, so the first is lost"]
        );
        assert_eq!(
            cc("#cloud-config\nruncmd: [a]\n---\nruncmd: [b]\n"),
            ["seed/user-data:3:1: a second YAML document (`---`): cloud-init reads exactly one"]
        );
        assert_eq!(
            cc("#cloud-config\n- runcmd\n"),
            ["seed/user-data:2:1: the cloud-config is a list; cloud-init needs a mapping of keys (`users:`, `runcmd:` …)"]
        );
    }

    #[test]
    fn messages_never_quote_values_or_control_characters() {
        let msgs = cc(
            "#cloud-config\nusers:\n  - name: ops\n    passwd: [\"$6$secret\"]\n\"\\e[31m\": 1\n",
        );
        let all = msgs.join("\n");
        assert!(!all.contains("secret"), "{all}");
        assert!(!all.contains('\u{1b}'), "{all}");
    }

    fn nc(text: &str) -> Vec<String> {
        check_network_config(Path::new("nc"), text)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn network_config_shapes() {
        assert_eq!(
            nc("network:\n  version: 2\n  ethernets:\n    e:\n      dhcp4: true\n"),
            Vec::<String>::new()
        );
        assert_eq!(
            nc("version: 1\nconfig:\n  - type: physical\n    name: eth0\n"),
            Vec::<String>::new()
        );
        assert_eq!(nc("ethernets: {}\n"), ["nc:1:1: no `version` key: a cloud-init network-config needs `version: 1` or `version: 2`"]);
        assert_eq!(
            nc("version: 3\n"),
            ["nc:1:10: version: `version` must be 1 or 2"]
        );
        assert_eq!(
            nc("version: 2\nethernet:\n  e: {}\n"),
            ["nc:2:1: ethernet: unknown key in a version 2 network-config (known: version, renderer, ethernets, wifis, bonds, bridges, vlans, tunnels, vrfs, modems)"]
        );
        assert_eq!(
            nc("version: 2\nethernets:\n  e: dhcp\n"),
            ["nc:3:6: ethernets.e: expected a mapping of settings, found text"]
        );
        assert_eq!(nc("version: 1\nconfig:\n  - type: phys\n"), ["nc:3:11: config[0].type: unknown type; version 1 knows physical, bond, bridge, vlan, nameserver, route, infiniband"]);
        assert_eq!(
            nc("version: 1\nconfig:\n  - type: physical\n"),
            ["nc:3:5: config[0]: a physical entry needs `name`"]
        );
        assert_eq!(
            nc("version: 2\n  ethernets: {}\n"),
            ["nc:2:12: not valid YAML: mapping values are not allowed in this context"]
        );
    }

    #[test]
    fn meta_data_shapes() {
        let md = |t: &str| -> Vec<String> {
            check_meta_data(Path::new("md"), t)
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            md("instance-id: a\nlocal-hostname: b\n"),
            Vec::<String>::new()
        );
        assert_eq!(md("{\"instance-id\": \"a\"}"), Vec::<String>::new());
        assert_eq!(
            md("local-hostname: [a]\n"),
            ["md:1:17: local-hostname: expected text, found a list"]
        );
        assert_eq!(md("- a\n"), ["md:1:1: meta-data is a list; it must be a mapping (`key: value` lines or a JSON object)"]);
        assert_eq!(md("a: 'x\n"), ["md:1:4: not valid YAML: while scanning a quoted scalar, found unexpected end of stream"]);
    }
}
