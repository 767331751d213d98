//! Mutation fuzzing of every built-in attestor module's evidence parser:
//! garbage must be refused cleanly (`Malformed`, `Rejected`,
//! `NoTrustSource`), never trap the module (`AttestError::Module`: a panic,
//! a trap, the time or memory limit, an answer over the host's limits),
//! never panic the host's crypto capabilities, and never be accepted unless
//! it still proves exactly what the genuine evidence proved.
//!
//! Each method gets a trust source and genuine evidence made here (keys,
//! tokens, certificates, PKCS#7, a TPM quote), so cases get past "no trust
//! source" and reach the parsers. Four kinds of case per method:
//! - junk: empty, truncated or deeply nested JSON, replacement characters,
//!   200 KB strings; never acceptable;
//! - fields: the genuine evidence with each top-level field emptied,
//!   retyped, made huge or dropped;
//! - mutants of the genuine evidence: byte flips, truncations, insertions,
//!   duplicated and swapped segments, splices, and JSON-aware edits (fields
//!   dropped, renamed or retyped, huge strings, deep nesting, invalid
//!   numbers, duplicate keys, base64 fields replaced by random bytes of 0 to
//!   ~64 KiB or by their own decoded bytes mutated);
//! - signed: where the parsers sit behind a signature (JWT claims, the AWS
//!   document, x509pop certificates, TPM quotes), evidence over mutated
//!   content signed with the test's keys. It may be accepted; a module
//!   failure is still a bug.
//!
//! `CASTELLAN_FUZZ_ITERATIONS` (default 1000, 9 to 12 s for all methods in
//! a debug build on 2 cores) sets the mutants and the signed cases per
//! method: raise it for a longer run. `CASTELLAN_FUZZ_SEED` (hex or decimal)
//! changes the seed. A failure names the method, kind, case and seeds, with
//! a truncated preview of the evidence (which holds no private key
//! material). Keys are fresh on every run, so a case replays the same
//! mutations over equivalent evidence rather than the same bytes.
//!
//! The sandbox runs with a deadline of seconds instead of the production
//! 50 ms: a parser that never ends still trips it, a busy CI machine does
//! not. The slowest call per method is printed (`--nocapture`).

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::{Map, Value, json};

use super::{AttestError, Attestation, Attestors};
use crate::config::SandboxConfig;
use crate::trust::{Registry, TrustSourceSpec};

/// Mutants and signed cases per method unless `CASTELLAN_FUZZ_ITERATIONS`
/// says otherwise.
const DEFAULT_ITERATIONS: usize = 1000;
/// The run's seed unless `CASTELLAN_FUZZ_SEED` says otherwise.
const DEFAULT_SEED: u64 = 0xca57_e11a_f022_5eed;
/// Random byte strings in base64 fields reach this length (~64 KiB).
const BIG: usize = 64 * 1024;
/// Evidence is cut at 1 MiB: 16 times the default `http.max_body_bytes`.
const MAX_EVIDENCE: usize = 1 << 20;
/// Failures printed in full per method; the rest are counted.
const MAX_REPORTED: usize = 12;

/// Every built-in method; a new one must get a target here.
const FUZZED: &[&str] = &[
    "aws_iid",
    "azure_msi",
    "gcp_iit",
    "github_oidc",
    "join_token",
    "k8s_sat",
    "tpm",
    "unix",
    "x509pop",
];

const TRUST_DOMAIN: &str = "example.org";
const KID: &str = "fuzz-1";

// === the harness ===

/// The built-in modules, compiled once for all the tests here.
fn attestors() -> &'static Attestors {
    static ATTESTORS: OnceLock<Attestors> = OnceLock::new();
    ATTESTORS.get_or_init(|| {
        let config = SandboxConfig {
            deadline_ms: 5_000,
            ..SandboxConfig::default()
        };
        Attestors::embedded(&config).unwrap()
    })
}

fn iterations() -> usize {
    std::env::var("CASTELLAN_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_ITERATIONS)
}

fn run_seed() -> u64 {
    let Ok(v) = std::env::var("CASTELLAN_FUZZ_SEED") else {
        return DEFAULT_SEED;
    };
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
    .unwrap_or(DEFAULT_SEED)
}

/// Makes signed evidence over mutated content.
type Signer = Box<dyn Fn(&mut Rng) -> Option<String>>;

/// One method under fuzz.
struct Target {
    method: &'static str,
    registry: Arc<Registry>,
    context: Value,
    /// Genuine evidence: each must attest.
    seeds: Vec<String>,
    signed: Option<Signer>,
    /// Whether a mutant that was accepted as this attestation is fine to
    /// accept. By default only one that proves what a seed proved is.
    accepts: Option<fn(&str, &Attestation) -> bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Fixed junk: never acceptable.
    Junk,
    /// A seed with one top-level field emptied, retyped, made huge or
    /// dropped.
    Field,
    Mutant,
    Signed,
}

/// What one method's run found.
struct Run<'t> {
    target: &'t Target,
    genuine: Vec<(String, Vec<String>)>,
    seed: u64,
    cases: usize,
    /// Answers by kind of case, for the summary.
    tally: BTreeMap<(Kind, &'static str), usize>,
    failed: usize,
    /// The first failures, described.
    failures: Vec<String>,
    slowest: (Duration, String),
}

impl Run<'_> {
    /// Attests `evidence` and records anything but a clean answer.
    fn check(&mut self, kind: Kind, case: usize, case_seed: u64, evidence: &str) {
        let t = self.target;
        self.cases += 1;
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            attestors().attest(t.method, evidence, t.registry.snapshot(), &t.context)
        }));
        let took = started.elapsed();
        if took > self.slowest.0 {
            self.slowest = (took, format!("{kind:?} case {case}"));
        }
        let answer = match &outcome {
            Err(_) => "host panic",
            Ok(Ok(_)) => "accepted",
            Ok(Err(AttestError::Malformed(_))) => "malformed",
            Ok(Err(AttestError::Rejected(_))) => "rejected",
            Ok(Err(AttestError::NoTrustSource(_))) => "no trust source",
            Ok(Err(AttestError::Module(_))) => "module failure",
            Ok(Err(_)) => "other error",
        };
        *self.tally.entry((kind, answer)).or_default() += 1;
        let problem = match outcome {
            Err(panic) => Some(format!(
                "the host panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("?")
            )),
            Ok(Err(AttestError::Malformed(_) | AttestError::Rejected(_) | AttestError::NoTrustSource(_))) => {
                None
            }
            Ok(Err(e)) => Some(format!("{e}")),
            Ok(Ok(a)) => {
                let fine = match (kind, t.accepts) {
                    (Kind::Junk, _) => false,
                    (Kind::Signed, _) => true,
                    (Kind::Field | Kind::Mutant, Some(accepts)) => accepts(evidence, &a),
                    (Kind::Field | Kind::Mutant, None) => self
                        .genuine
                        .iter()
                        .any(|(subject, selectors)| *subject == a.subject && *selectors == a.selectors),
                };
                (!fine).then(|| format!("accepted as `{}` {:?}", a.subject, a.selectors))
            }
        };
        let Some(problem) = problem else {
            return;
        };
        self.failed += 1;
        if self.failures.len() < MAX_REPORTED {
            let seeds = match kind {
                Kind::Mutant | Kind::Signed => {
                    format!(" (run seed {:#x}, case seed {case_seed:#x})", self.seed)
                }
                Kind::Junk | Kind::Field => String::new(),
            };
            self.failures.push(format!(
                "{} {kind:?} case {case}{seeds}: {problem}\n    evidence: {}",
                t.method,
                preview(evidence)
            ));
        }
    }
}

/// Runs every kind of case against `target`; panics with a report if any
/// answer was not a clean refusal.
fn fuzz(target: Target) {
    let seed = run_seed();
    let n = iterations();
    let a = attestors();
    let genuine = target
        .seeds
        .iter()
        .map(|e| {
            let ok = a
                .attest(target.method, e, target.registry.snapshot(), &target.context)
                .unwrap_or_else(|err| panic!("{}: genuine evidence must attest: {err}", target.method));
            (ok.subject, ok.selectors)
        })
        .collect();
    let mut run = Run {
        target: &target,
        genuine,
        seed,
        cases: 0,
        tally: BTreeMap::new(),
        failed: 0,
        failures: Vec::new(),
        slowest: (Duration::ZERO, String::new()),
    };
    let started = Instant::now();
    let method_seed = target.method.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    // Mixed before the case number joins, so that another run seed gives
    // other cases rather than the same ones in another order.
    let case_seed = |kind: u64, i: usize| mix(mix(mix(seed) ^ method_seed ^ kind) ^ i as u64);

    for (i, junk) in junk().iter().enumerate() {
        run.check(Kind::Junk, i, 0, junk);
    }
    for (i, variant) in field_variants(&target.seeds).iter().enumerate() {
        run.check(Kind::Field, i, 0, variant);
    }
    // A JSON object's values as an array, in every order: serde would take
    // one of them for the evidence struct, so each must be refused.
    for (i, array) in target.seeds.iter().flat_map(|s| as_arrays(s)).enumerate() {
        run.check(Kind::Junk, 1000 + i, 0, &array);
    }
    for i in 0..n {
        let s = case_seed(1, i);
        let evidence = mutant(&mut Rng::new(s), &target.seeds);
        run.check(Kind::Mutant, i, s, &evidence);
    }
    if let Some(signed) = &target.signed {
        for i in 0..n {
            let s = case_seed(2, i);
            if let Some(evidence) = signed(&mut Rng::new(s)) {
                run.check(Kind::Signed, i, s, &cap(evidence));
            }
        }
    }
    let tally: Vec<String> = run
        .tally
        .iter()
        .map(|((kind, answer), n)| format!("{kind:?} {answer} {n}"))
        .collect();
    println!(
        "{}: {} cases in {:.1?}, slowest call {:.1?} ({}); {}",
        target.method,
        run.cases,
        started.elapsed(),
        run.slowest.0,
        run.slowest.1,
        tally.join(", ")
    );
    assert!(
        run.failed == 0,
        "{}: {} of {} cases were not a clean refusal (the first {} here):\n{}",
        target.method,
        run.failed,
        run.cases,
        run.failures.len(),
        run.failures.join("\n")
    );
}

/// The values of JSON object evidence as arrays, in every order (objects of
/// up to 6 fields; none for other evidence).
fn as_arrays(evidence: &str) -> Vec<String> {
    fn orders(items: &[Value]) -> Vec<Vec<Value>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut out = Vec::new();
        for i in 0..items.len() {
            let mut rest = items.to_vec();
            let first = rest.remove(i);
            for mut tail in orders(&rest) {
                tail.insert(0, first.clone());
                out.push(tail);
            }
        }
        out
    }
    match serde_json::from_str::<Value>(evidence) {
        Ok(Value::Object(fields)) if fields.len() <= 6 => {
            let values: Vec<Value> = fields.into_iter().map(|(_, v)| v).collect();
            orders(&values)
                .into_iter()
                .map(|o| Value::Array(o).to_string())
                .collect()
        }
        _ => Vec::new(),
    }
}

/// The start of `evidence`, escaped, with its length; for a compact JWS,
/// the start of its payload too.
fn preview(evidence: &str) -> String {
    let head = |text: &str| text.chars().take(160).collect::<String>();
    let mut out = format!("{:?}… ({} bytes)", head(evidence), evidence.len());
    if let Some(payload) = evidence
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p.trim()).ok())
    {
        let payload = String::from_utf8_lossy(&payload);
        out.push_str(&format!(
            "\n    payload: {:?}… ({} bytes)",
            head(&payload),
            payload.len()
        ));
    }
    out
}

fn cap(mut evidence: String) -> String {
    if evidence.len() > MAX_EVIDENCE {
        let mut end = MAX_EVIDENCE;
        while !evidence.is_char_boundary(end) {
            end -= 1;
        }
        evidence.truncate(end);
    }
    evidence
}

// === random choices ===

/// xorshift64: small and deterministic.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// A non-empty range `start..end` within `len` (> 0).
    fn range(&mut self, len: usize) -> (usize, usize) {
        let start = self.below(len);
        (start, start + 1 + self.below(len - start))
    }

    /// A length for random content: often 0 or tiny, often at a limit the
    /// modules or the host enforce, sometimes ~64 KiB.
    fn length(&mut self) -> usize {
        const LIMITS: &[usize] = &[128, 129, 253, 254, 256, 257, 1000, 1024, 1025, 4096, 16 * 1024];
        match self.below(8) {
            0 => 0,
            1 => 1,
            2 => self.below(64),
            3 => self.below(1024),
            4 => self.below(8192),
            5 | 6 => *self.pick(LIMITS),
            _ => BIG - 16 + self.below(32),
        }
    }

    /// Text of about `len` characters that parsers choke on: separators,
    /// control, bidi and astral characters among plain ones.
    fn text(&mut self, len: usize) -> String {
        const PIECES: &[&str] = &[
            "a", "Z", "0", "-", ".", ":", "/", "_", " ", "\0", "\n", "\u{7f}", "\u{fffd}", "\u{202e}", "é",
            "𝕏", "\"", "\\", "%00", "=",
        ];
        let plain = self.one_in(2);
        (0..len)
            .map(|_| if plain { "a" } else { *self.pick(PIECES) })
            .collect()
    }
}

/// splitmix64: spreads the run's seed over the cases.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// === mutations ===

/// Bytes that matter to the formats under test: JSON and JWS structure,
/// the ends of the base64 alphabets, DER and TPM length bytes.
const INTERESTING: &[u8] = b"\0\x01\x7f\x80\xff{}[]\":,.=-_/+ \\\n0Aa";

/// One byte-level edit of `data`; `donor` is spliced from.
fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, donor: &[u8]) {
    let len = data.len();
    match rng.below(9) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = *rng.pick(INTERESTING);
        }
        2 => data.truncate(rng.below(len + 1)),
        3 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(32);
            let insert: Vec<u8> = (0..n)
                .map(|_| {
                    if rng.one_in(2) {
                        *rng.pick(INTERESTING)
                    } else {
                        rng.next_u64() as u8
                    }
                })
                .collect();
            data.splice(at..at, insert);
        }
        4 if len > 0 => {
            let (start, end) = rng.range(len);
            data.drain(start..end);
        }
        5 if len > 0 => {
            let (start, end) = rng.range(len);
            let segment = data[start..end].to_vec();
            let at = rng.below(len + 1);
            for _ in 0..1 + rng.below(3) {
                data.splice(at..at, segment.iter().copied());
            }
        }
        6 if len > 1 => {
            let n = 1 + rng.below(len / 2);
            let a = rng.below(len - 2 * n + 1);
            let b = a + n + rng.below(len - a - 2 * n + 1);
            for k in 0..n {
                data.swap(a + k, b + k);
            }
        }
        7 if !donor.is_empty() => {
            let (start, end) = rng.range(donor.len());
            let a = rng.below(len + 1);
            let b = a + rng.below(len - a + 1);
            data.splice(a..b, donor[start..end].iter().copied());
        }
        8 if len > 0 => {
            // Boundary integers over 1, 2 or 4 bytes: length fields.
            const VALUES: &[[u8; 4]] = &[
                [0; 4],
                [0xff; 4],
                [0x7f, 0xff, 0xff, 0xff],
                [0x80, 0, 0, 0],
                [0, 0, 0, 1],
            ];
            let width = *rng.pick(&[1, 2, 4]);
            let value = *rng.pick(VALUES);
            let i = rng.below(len);
            for (d, v) in data[i..].iter_mut().zip(&value[..width]) {
                *d = *v;
            }
        }
        _ => data.push(rng.next_u64() as u8),
    }
}

/// A JSON document under mutation. `raw` holds text spliced in where a
/// placeholder string stands, for what a `Value` cannot hold: deep
/// nesting, invalid numbers, duplicate keys, lone surrogates.
struct Doc {
    value: Value,
    raw: Vec<String>,
}

impl Doc {
    fn new(value: Value) -> Self {
        Self {
            value,
            raw: Vec::new(),
        }
    }

    fn render(&self) -> String {
        let mut text = self.value.to_string();
        // Last first: a later raw text may hold an earlier placeholder.
        for (i, raw) in self.raw.iter().enumerate().rev() {
            text = text.replace(&format!("\"\\u0001raw{i}\\u0001\""), raw);
        }
        text
    }
}

fn placeholder(raw: &mut Vec<String>, text: String) -> Value {
    raw.push(text);
    Value::String(format!("\u{1}raw{}\u{1}", raw.len() - 1))
}

/// A node of `v` at random: the root, or somewhere below it.
fn pick_node<'a>(rng: &mut Rng, v: &'a mut Value) -> &'a mut Value {
    let n = match &*v {
        Value::Object(m) => m.len(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if n == 0 || rng.one_in(3) {
        return v;
    }
    let i = rng.below(n);
    match v {
        Value::Object(m) => match m.values_mut().nth(i) {
            Some(child) => pick_node(rng, child),
            None => unreachable!("index below the length"),
        },
        Value::Array(a) => pick_node(rng, &mut a[i]),
        other => other,
    }
}

/// The leaves of `v` (values that are not non-empty containers).
fn leaves(v: &Value) -> usize {
    match v {
        Value::Object(m) if !m.is_empty() => m.values().map(leaves).sum(),
        Value::Array(a) if !a.is_empty() => a.iter().map(leaves).sum(),
        _ => 1,
    }
}

/// Leaf `n` of `v`, depth first.
fn nth_leaf(v: &mut Value, n: usize) -> &mut Value {
    // Which child holds it, and its number there.
    let mut rest = n;
    let mut holds = |child: &Value| {
        let count = leaves(child);
        if rest < count {
            return true;
        }
        rest -= count;
        false
    };
    let found = match &*v {
        Value::Object(m) => m.values().position(&mut holds),
        Value::Array(a) => a.iter().position(&mut holds),
        _ => None,
    };
    match (found, v) {
        (Some(i), Value::Object(m)) => match m.values_mut().nth(i) {
            Some(child) => nth_leaf(child, rest),
            None => unreachable!("index below the length"),
        },
        (Some(i), Value::Array(a)) => nth_leaf(&mut a[i], rest),
        (_, leaf) => leaf,
    }
}

/// A leaf of `v`, each as likely as the others.
fn pick_leaf<'a>(rng: &mut Rng, v: &'a mut Value) -> &'a mut Value {
    let n = rng.below(leaves(v));
    nth_leaf(v, n)
}

/// A number parsers trip on: signs, widths, fractions, huge exponents.
fn edge_number(rng: &mut Rng) -> Value {
    match rng.below(10) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1.5),
        3 => json!(u32::MAX),
        4 => json!(u64::from(u32::MAX) + 1),
        5 => json!(i64::MAX),
        6 => json!(i64::MIN),
        7 => json!(u64::MAX),
        8 => json!(1e300),
        _ => json!(-1e-300),
    }
}

fn random_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 2 { 4 } else { 6 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.one_in(2)),
        2 => edge_number(rng),
        3 => {
            let len = rng.below(40);
            Value::String(rng.text(len))
        }
        4 => Value::Array((0..rng.below(4)).map(|_| random_value(rng, depth + 1)).collect()),
        _ => Value::Object(
            (0..rng.below(4))
                .map(|_| {
                    let len = rng.below(12);
                    (rng.text(len), random_value(rng, depth + 1))
                })
                .collect(),
        ),
    }
}

/// A base64 text of random bytes, 0 to ~64 KiB, in either alphabet.
fn random_base64(rng: &mut Rng) -> String {
    let len = rng.length();
    let bytes = rng.bytes(len);
    match rng.below(3) {
        0 => URL_SAFE_NO_PAD.encode(bytes),
        1 => {
            // Line-wrapped, as PEM bodies and some tools write it.
            let text = STANDARD.encode(bytes);
            let lines: Vec<&str> = text
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap_or_default())
                .collect();
            lines.join("\n")
        }
        _ => STANDARD.encode(bytes),
    }
}

/// An edit of a string value: its decoded bytes mutated when it is
/// base64, random bytes, or its own text mutated.
fn mutate_string(rng: &mut Rng, s: &str) -> String {
    match rng.below(5) {
        0 => random_base64(rng),
        1 | 2 => {
            let decoded = STANDARD
                .decode(s.trim())
                .map(|b| (b, false))
                .or_else(|_| URL_SAFE_NO_PAD.decode(s.trim()).map(|b| (b, true)));
            match decoded {
                Ok((mut bytes, url)) => {
                    for _ in 0..1 + rng.below(3) {
                        mutate_bytes(rng, &mut bytes, &[]);
                    }
                    if url {
                        URL_SAFE_NO_PAD.encode(bytes)
                    } else {
                        STANDARD.encode(bytes)
                    }
                }
                Err(_) => random_base64(rng),
            }
        }
        3 => {
            let mut bytes = s.as_bytes().to_vec();
            mutate_bytes(rng, &mut bytes, &[]);
            String::from_utf8_lossy(&bytes).into_owned()
        }
        _ => {
            let len = rng.length();
            rng.text(len)
        }
    }
}

/// Removes a member or element somewhere in `v`.
fn drop_somewhere(rng: &mut Rng, v: &mut Value) {
    let node = pick_node(rng, v);
    match node {
        Value::Object(m) if !m.is_empty() => {
            let key = m.keys().nth(rng.below(m.len())).cloned().unwrap_or_default();
            m.remove(&key);
        }
        Value::Array(a) if !a.is_empty() => {
            a.remove(rng.below(a.len()));
        }
        _ => *node = Value::Null,
    }
}

/// One structure-aware edit of a JSON document. Most edit one leaf, which
/// keeps the document parseable and so reaches the parsers behind it.
fn mutate_json(rng: &mut Rng, doc: &mut Doc) {
    let op = rng.below(18);
    if op < 8 {
        let leaf = pick_leaf(rng, &mut doc.value);
        *leaf = match leaf {
            Value::String(s) => Value::String(mutate_string(rng, s)),
            _ if rng.one_in(2) => edge_number(rng),
            _ => Value::String(random_base64(rng)),
        };
        return;
    }
    let node = pick_node(rng, &mut doc.value);
    match op - 8 {
        0 => *node = random_value(rng, 0),
        1 => {
            let len = 64 * 1024 + rng.below(136 * 1024);
            *node = Value::String(if rng.one_in(2) {
                "A".repeat(len)
            } else {
                rng.text(len)
            });
        }
        2 => {
            let depth = *rng.pick(&[2, 16, 127, 128, 129, 1000, 50_000]);
            let inner = node.to_string();
            let text = if rng.one_in(2) {
                format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth))
            } else {
                format!("{}{inner}{}", "{\"a\":".repeat(depth), "}".repeat(depth))
            };
            *node = placeholder(&mut doc.raw, text);
        }
        3 => {
            *node = match node {
                Value::String(s) => Value::String(mutate_string(rng, s)),
                _ => Value::String(random_base64(rng)),
            }
        }
        4 => drop_somewhere(rng, node),
        5 => match node {
            Value::Object(m) => {
                let key = match m.keys().nth(rng.below(m.len().max(1))) {
                    Some(k) if rng.one_in(2) => k.to_uppercase(),
                    _ => "x-fuzz".to_owned(),
                };
                m.insert(key, random_value(rng, 0));
            }
            Value::Array(a) => {
                let item = match a.first() {
                    Some(v) if rng.one_in(2) => v.clone(),
                    _ => random_value(rng, 0),
                };
                // Up to 300 copies, within ~256 KiB in all.
                let room = (256 * 1024) / item.to_string().len().max(1);
                let copies = rng.below(300).min(room);
                a.extend(std::iter::repeat_n(item, copies));
            }
            _ => *node = Value::Array(vec![node.take()]),
        },
        6 => *node = edge_number(rng),
        7 => {
            const RAW: &[&str] = &[
                "1e999",
                "-1e999",
                "NaN",
                "Infinity",
                "-",
                "01",
                "1.",
                "-0",
                "\"\\ud800\"",
                "\"\\u0000\"",
                "\"\\x41\"",
                "[,]",
                "{,}",
                "tru",
                "\"unterminated",
                "/* */ 1",
                "",
            ];
            let text = (*rng.pick(RAW)).to_owned();
            *node = placeholder(&mut doc.raw, text);
        }
        8 => {
            // A duplicate key: serde refuses some, keeps the last of others.
            if let Value::Object(m) = &*node
                && let Some(key) = m.keys().nth(rng.below(m.len().max(1)))
            {
                let mut members: Vec<String> = m.iter().map(|(k, v)| format!("{}:{v}", json!(k))).collect();
                members.push(format!("{}:{}", json!(key), random_value(rng, 0)));
                let text = format!("{{{}}}", members.join(","));
                *node = placeholder(&mut doc.raw, text);
            } else {
                *node = Value::Object(Map::new());
            }
        }
        _ => {
            // A renamed member: one missing field and one unknown.
            if let Value::Object(m) = node
                && let Some(key) = m.keys().nth(rng.below(m.len().max(1))).cloned()
                && let Some(v) = m.remove(&key)
            {
                m.insert(format!("{key}{}", rng.text(1)), v);
            } else {
                *node = Value::String(String::new());
            }
        }
    }
}

/// One edit of a compact JWS: a part's JSON or bytes, a part replaced,
/// parts dropped, duplicated or swapped.
fn mutate_jws(rng: &mut Rng, token: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let i = rng.below(parts.len());
    match rng.below(5) {
        0 | 1 => {
            let decoded = URL_SAFE_NO_PAD.decode(parts[i].trim()).unwrap_or_default();
            match serde_json::from_slice::<Value>(&decoded) {
                Ok(v) => {
                    let mut doc = Doc::new(v);
                    for _ in 0..1 + rng.below(2) {
                        mutate_json(rng, &mut doc);
                    }
                    parts[i] = URL_SAFE_NO_PAD.encode(doc.render());
                }
                Err(_) => {
                    let mut bytes = decoded;
                    mutate_bytes(rng, &mut bytes, &[]);
                    parts[i] = URL_SAFE_NO_PAD.encode(bytes);
                }
            }
        }
        2 => {
            let mut bytes = URL_SAFE_NO_PAD.decode(parts[i].trim()).unwrap_or_default();
            mutate_bytes(rng, &mut bytes, &[]);
            parts[i] = URL_SAFE_NO_PAD.encode(bytes);
        }
        3 => parts[i] = random_base64(rng),
        _ => match rng.below(4) {
            0 => {
                parts.remove(i);
            }
            1 => parts.insert(i, parts[i].clone()),
            2 => parts.insert(i, String::new()),
            _ => {
                let j = rng.below(parts.len());
                parts.swap(i, j);
            }
        },
    }
    parts.join(".")
}

/// One to three edits of a seed, each byte-level or aware of the
/// evidence's structure (JSON or compact JWS).
fn mutant(rng: &mut Rng, seeds: &[String]) -> String {
    let mut evidence = rng.pick(seeds).clone();
    let donor = rng.pick(seeds).clone();
    // Byte-level edits mostly break JSON at once; structure-aware ones get
    // past it. A case sticks to one or the other.
    let structured = !rng.one_in(3);
    for _ in 0..1 + rng.below(3) {
        evidence = match serde_json::from_str::<Value>(&evidence) {
            Ok(v) if structured => {
                let mut doc = Doc::new(v);
                mutate_json(rng, &mut doc);
                doc.render()
            }
            Err(_) if structured && evidence.matches('.').count() >= 2 => mutate_jws(rng, &evidence),
            _ => {
                let mut bytes = evidence.into_bytes();
                mutate_bytes(rng, &mut bytes, donor.as_bytes());
                String::from_utf8_lossy(&bytes).into_owned()
            }
        };
        evidence = cap(evidence);
    }
    evidence
}

/// Evidence no method may accept.
fn junk() -> Vec<String> {
    let mut out: Vec<String> = [
        "",
        " ",
        "\n",
        "{",
        "}",
        "[",
        "]",
        "null",
        "[]",
        "{}",
        "true",
        "0",
        "-1",
        "\"\"",
        "\"x\"",
        "{\"\":\"\"}",
        "\u{fffd}",
        "\u{fffd}\u{fffd}{\u{fffd}",
        "{\"\u{fffd}\": \"\u{fffd}\"}",
        "\0",
        "a.b.c",
        "..",
        "...",
        "e30.e30.",
        "e30.e30.e30",
        "eyJ.eyJ.eyJ",
        "{\"a\":1,\"a\":2}",
        "1e999",
        "[1,2,3]",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    out.push("A".repeat(200 * 1024));
    out.push("\u{fffd}".repeat(200 * 1024 / 3));
    out.push(format!("\"{}\"", "x".repeat(200 * 1024)));
    out.push("[".repeat(200 * 1024));
    out.push(format!("{}{}", "[".repeat(5_000), "]".repeat(5_000)));
    out.push("{\"a\":".repeat(40_000));
    out.push(format!("{0}.{0}.{0}", "A".repeat(70 * 1024)));
    out.push(Value::Object((0..10_000).map(|i| (format!("k{i}"), json!(i))).collect()).to_string());
    out
}

/// Each seed with every top-level field emptied, retyped, made huge or
/// dropped; a JWS with a part more or less.
fn field_variants(seeds: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for seed in seeds {
        let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(seed) else {
            out.push(format!("{seed}."));
            out.push(
                seed.rsplit_once('.')
                    .map(|(head, _)| head.to_owned())
                    .unwrap_or_default(),
            );
            continue;
        };
        for key in fields.keys() {
            for replacement in [
                json!(""),
                json!(null),
                json!(0),
                json!([]),
                json!({}),
                json!(true),
                json!("A".repeat(200 * 1024)),
            ] {
                let mut v = fields.clone();
                v.insert(key.clone(), replacement);
                out.push(Value::Object(v).to_string());
            }
            let mut v = fields.clone();
            v.remove(key);
            out.push(Value::Object(v).to_string());
        }
    }
    out
}

// === fixtures ===

fn registry(specs: Vec<Value>) -> Arc<Registry> {
    let sources = specs
        .into_iter()
        .map(|s| {
            serde_json::from_value::<TrustSourceSpec>(s)
                .unwrap()
                .into_source("config")
                .unwrap()
        })
        .collect();
    Arc::new(Registry::new(sources).unwrap())
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    STANDARD.encode(bytes)
}

fn now() -> i64 {
    crate::util::now_unix()
}

/// The hex SHA-256 of the key "being certified", as the host puts it in
/// the context.
fn key_sha256() -> String {
    crate::util::sha256_hex(b"the fuzzed request's key")
}

fn context() -> Value {
    json!({ "trust_domain": TRUST_DOMAIN, "key_sha256": key_sha256() })
}

/// A context with a live challenge, as the host builds it once it has taken
/// the challenge the evidence names.
fn challenge_context(extra: Map<String, Value>) -> (Value, String, String) {
    let id = uuid::Uuid::new_v4().to_string();
    let nonce = b64(crate::util::random_bytes::<32>());
    let mut challenge = json!({ "id": id, "nonce": nonce, "expires_at": now() + 300 });
    for (k, v) in extra {
        challenge[k] = v;
    }
    let mut context = context();
    context["challenge"] = challenge;
    (context, id, nonce)
}

/// An ES256 key with its JWKS; signs any payload text.
struct JwtKey {
    key: EcdsaKeyPair,
    jwks: Value,
}

impl JwtKey {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let point = key.public_key().as_ref();
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": KID, "use": "sig", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]});
        Self { key, jwks }
    }

    /// A compact JWS over `payload`, which need not be JSON.
    fn sign(&self, payload: &str) -> String {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": KID}).to_string();
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signature = self.key.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

/// A JWT method: its issuer, audience and genuine claims.
struct JwtMethod {
    method: &'static str,
    issuer: &'static str,
    audience: &'static str,
    claims: fn(i64) -> Value,
}

fn jwt_target(m: JwtMethod) -> Target {
    let key = JwtKey::new();
    let registry = registry(vec![json!({
        "name": format!("fuzz-{}", m.method), "method": m.method, "issuer": m.issuer,
        "audiences": [m.audience], "jwks": key.jwks,
    })]);
    let now = now();
    let claims = (m.claims)(now);
    // A second seed with `aud` as an array.
    let mut second = claims.clone();
    second["aud"] = json!([m.audience, "someone-else"]);
    let seeds = vec![key.sign(&claims.to_string()), key.sign(&second.to_string())];
    let (issuer, audience) = (m.issuer, m.audience);
    let signed: Signer = Box::new(move |rng: &mut Rng| {
        let mut doc = Doc::new(claims.clone());
        for _ in 0..1 + rng.below(3) {
            mutate_json(rng, &mut doc);
        }
        // Mostly keep what the SDK checks first, so the module's own claim
        // parsing runs.
        if rng.below(4) != 0
            && let Value::Object(c) = &mut doc.value
        {
            c.insert("iss".into(), json!(issuer));
            c.insert("aud".into(), json!(audience));
            c.insert("exp".into(), json!(now + 600));
        }
        Some(key.sign(&doc.render()))
    });
    Target {
        method: m.method,
        registry,
        context: context(),
        seeds,
        signed: Some(signed),
        accepts: None,
    }
}

/// A CA and what it issues.
struct Pki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        Self {
            ca: rcgen::CertifiedIssuer::self_signed(p, key).unwrap(),
        }
    }

    fn issuer(&self) -> &rcgen::Issuer<'static, rcgen::KeyPair> {
        &self.ca
    }

    fn issue(
        &self,
        p: rcgen::CertificateParams,
        key: &rcgen::KeyPair,
    ) -> Result<rcgen::Certificate, rcgen::Error> {
        p.signed_by(key, self.issuer())
    }

    /// An intermediate CA under this one.
    fn intermediate(&self, name: &str) -> Pki {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        Pki {
            ca: rcgen::CertifiedIssuer::signed_by(p, key, self.issuer()).unwrap(),
        }
    }
}

fn client_params(cn: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(vec![format!("{cn}.hosts.example")]).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p
}

// === the methods ===

#[test]
fn every_embedded_method_is_fuzzed() {
    assert_eq!(
        attestors().methods(),
        FUZZED,
        "give every built-in method a fuzz target"
    );
}

#[test]
fn k8s_sat_refuses_garbage_cleanly() {
    fuzz(jwt_target(JwtMethod {
        method: "k8s_sat",
        issuer: "https://kubernetes.default.svc.cluster.local",
        audience: "castellan",
        claims: |now| {
            json!({
                "iss": "https://kubernetes.default.svc.cluster.local", "aud": ["castellan"],
                "iat": now, "nbf": now, "exp": now + 600, "sub": "system:serviceaccount:prod:api",
                "kubernetes.io": {
                    "namespace": "prod",
                    "serviceaccount": {"name": "api", "uid": "8d1c2b9e-0000-4000-8000-000000000001"},
                    "pod": {"name": "api-1", "uid": "8d1c2b9e-0000-4000-8000-000000000002"},
                },
            })
        },
    }));
}

#[test]
fn github_oidc_refuses_garbage_cleanly() {
    fuzz(jwt_target(JwtMethod {
        method: "github_oidc",
        issuer: "https://token.actions.githubusercontent.com",
        audience: "castellan",
        claims: |now| {
            json!({
                "iss": "https://token.actions.githubusercontent.com", "aud": "castellan",
                "iat": now, "nbf": now, "exp": now + 600, "jti": "gh-fuzz-1",
                "sub": "repo:acme/api:environment:production",
                "repository": "acme/api", "repository_owner": "acme", "ref": "refs/heads/main",
                "environment": "production", "event_name": "push",
                "workflow_ref": "acme/api/.github/workflows/deploy.yml@refs/heads/main",
                "job_workflow_ref": "acme/api/.github/workflows/deploy.yml@refs/heads/main",
                "runner_environment": "github-hosted",
            })
        },
    }));
}

#[test]
fn gcp_iit_refuses_garbage_cleanly() {
    fuzz(jwt_target(JwtMethod {
        method: "gcp_iit",
        issuer: "https://accounts.google.com",
        audience: "https://castellan.example",
        claims: |now| {
            json!({
                "iss": "https://accounts.google.com", "aud": "https://castellan.example",
                "azp": "1234567890", "email": "web@acme-prod.iam.gserviceaccount.com",
                "iat": now, "exp": now + 600, "sub": "1234567890",
                "google": {"compute_engine": {
                    "project_id": "acme-prod", "project_number": 42, "zone": "europe-west1-b",
                    "instance_id": "4567890123", "instance_name": "web-1",
                    "instance_creation_timestamp": now - 86_400,
                }},
            })
        },
    }));
}

#[test]
fn azure_msi_refuses_garbage_cleanly() {
    fuzz(jwt_target(JwtMethod {
        method: "azure_msi",
        issuer: "https://sts.windows.net/7f3d1a2b-0000-4000-8000-00000000aaaa/",
        audience: "https://management.azure.com/",
        claims: |now| {
            json!({
                "iss": "https://sts.windows.net/7f3d1a2b-0000-4000-8000-00000000aaaa/",
                "aud": "https://management.azure.com/", "iat": now, "nbf": now, "exp": now + 600,
                "tid": "7f3d1a2b-0000-4000-8000-00000000aaaa", "oid": "0e1f2a3b-0000-4000-8000-00000000bbbb",
                "xms_mirid": "/subscriptions/sub-1/resourcegroups/rg-web/providers/Microsoft.Compute/virtualMachines/web-1",
                "uti": "fuzz-uti",
            })
        },
    }));
}

#[test]
fn join_token_refuses_garbage_cleanly() {
    fuzz(jwt_target(JwtMethod {
        method: "join_token",
        issuer: "castellan:join-token:example.org",
        audience: "castellan-join",
        claims: |now| {
            json!({
                "iss": "castellan:join-token:example.org", "aud": "castellan-join",
                "sub": "edge-1", "jti": "0b5e7c1d-0000-4000-8000-000000000003",
                "iat": now, "exp": now + 3600,
            })
        },
    }));
}

/// The host's unix evidence as the module reads it: a mutant still in
/// this shape is another process's genuine evidence, fine to accept.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // only the shape is checked
struct UnixEvidence {
    pid: u32,
    uid: u32,
    gid: u32,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
}

#[test]
fn unix_refuses_garbage_cleanly() {
    let seed = json!({
        "pid": 4242, "uid": 1000, "gid": 1000, "user": "alice", "group": "staff",
        "path": "/usr/local/bin/agent", "sha256": crate::util::sha256_hex(b"agent"),
    });
    let minimal = json!({ "pid": 0, "uid": 0, "gid": 0 });
    fuzz(Target {
        method: "unix",
        // Host-gathered evidence: no trust source is involved.
        registry: registry(Vec::new()),
        context: context(),
        seeds: vec![seed.to_string(), minimal.to_string()],
        signed: None,
        accepts: Some(|evidence, a| {
            serde_json::from_str::<UnixEvidence>(evidence)
                .is_ok_and(|e| a.subject == format!("uid/{}", e.uid))
        }),
    });
}

#[test]
fn x509pop_refuses_garbage_cleanly() {
    let root = Pki::new("Fuzz Hosts CA");
    let intermediate = root.intermediate("Fuzz Hosts Issuing CA");
    let registry = registry(vec![json!({
        "name": "fuzz-hosts", "method": "x509pop", "certificates": root.ca.pem(),
    })]);
    let (context, id, nonce) = challenge_context(Map::new());
    let message = format!("castellan-x509pop-v1\n{nonce}\n{}\n", key_sha256());
    let evidence = move |chain: &[&[u8]], key: &rcgen::KeyPair, algorithm: &str| {
        let signature = rcgen::SigningKey::sign(key, message.as_bytes()).unwrap();
        json!({
            "challenge_id": id, "certificates": chain.iter().map(b64).collect::<Vec<_>>(),
            "algorithm": algorithm, "signature": b64(signature),
        })
        .to_string()
    };
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = root.issue(client_params("edge-1"), &leaf_key).unwrap();
    let deep = intermediate.issue(client_params("edge-2"), &leaf_key).unwrap();
    let seeds = vec![
        evidence(&[leaf.der().as_ref()], &leaf_key, "ecdsa-p256-sha256"),
        evidence(
            &[deep.der().as_ref(), intermediate.ca.der().as_ref()],
            &leaf_key,
            "ecdsa-p256-sha256",
        ),
    ];

    // Certificates the CA really issued, with names of every size and shape.
    let signed: Signer = Box::new(move |rng: &mut Rng| {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).ok()?;
        p.extended_key_usages = vec![if rng.one_in(8) {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        if !rng.one_in(4) {
            let len = match rng.below(3) {
                0 => rng.below(16),
                1 => 250 + rng.below(12),
                _ => rng.below(2000),
            };
            p.distinguished_name
                .push(rcgen::DnType::CommonName, rng.text(len));
        }
        let names = match rng.below(4) {
            0 => 0,
            1 => 1 + rng.below(3),
            2 => 10 + rng.below(40),
            _ => 200 + rng.below(400),
        };
        // Ordinary names, or names of random lengths and characters.
        let ordinary = rng.one_in(3);
        for i in 0..names {
            let len = match rng.below(3) {
                0 => 1 + rng.below(16),
                1 => 250 + rng.below(12),
                _ => 1 + rng.below(400),
            };
            let text: String = if ordinary {
                format!("n{i}.hosts.example")
            } else {
                rng.text(len)
                    .chars()
                    .map(|c| if c.is_ascii() { c } else { 'x' })
                    .collect()
            };
            let text = rcgen::string::Ia5String::try_from(text).ok()?;
            p.subject_alt_names.push(if rng.one_in(2) {
                rcgen::SanType::DnsName(text)
            } else {
                rcgen::SanType::URI(text)
            });
        }
        let cert = if rng.one_in(4) {
            intermediate.issue(p, &leaf_key).ok()?
        } else {
            root.issue(p, &leaf_key).ok()?
        };
        let chain: Vec<&[u8]> = if rng.one_in(2) {
            vec![cert.der().as_ref(), intermediate.ca.der().as_ref()]
        } else {
            vec![cert.der().as_ref()]
        };
        Some(evidence(&chain, &leaf_key, "ecdsa-p256-sha256"))
    });
    fuzz(Target {
        method: "x509pop",
        registry,
        context,
        seeds,
        signed: Some(signed),
        accepts: None,
    });
}

/// An "AWS region" signing certificate (RSA, as AWS's are) and its key.
struct AwsRegion {
    cert_pem: String,
    cert_der: Vec<u8>,
    key: ring::signature::RsaKeyPair,
}

impl AwsRegion {
    fn new() -> Self {
        use rsa::pkcs8::EncodePrivateKey as _;
        let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let pkcs8 = private.to_pkcs8_der().unwrap();
        let pem = private.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        let kp = rcgen::KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Amazon Web Services LLC");
        let cert = p.self_signed(&kp).unwrap();
        Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key: ring::signature::RsaKeyPair::from_pkcs8(pkcs8.as_bytes()).unwrap(),
        }
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                message,
                &mut sig,
            )
            .unwrap();
        sig
    }

    /// A PKCS#7 SignedData over `content` with signed attributes, as the
    /// `rsa2048` endpoint returns.
    fn pkcs7(&self, content: &[u8]) -> Vec<u8> {
        use cms::cert::x509::der::asn1::{Any, ObjectIdentifier, OctetString, SetOfVec};
        use cms::cert::x509::der::{Decode as _, Encode as _};
        use cms::signed_data::{
            EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo, SignerInfos,
        };
        let oid = ObjectIdentifier::new_unwrap;
        let alg = |o: &str, null: bool| cms::cert::x509::spki::AlgorithmIdentifierOwned {
            oid: oid(o),
            parameters: null.then(Any::null),
        };
        let cert = cms::cert::x509::Certificate::from_der(&self.cert_der).unwrap();
        let digest = <sha2::Sha256 as sha2::Digest>::digest(content);
        let attr = |o: &str, v: Any| cms::cert::x509::attr::Attribute {
            oid: oid(o),
            values: SetOfVec::try_from(vec![v]).unwrap(),
        };
        let data = "1.2.840.113549.1.7.1";
        let attrs = SetOfVec::try_from(vec![
            attr("1.2.840.113549.1.9.3", Any::encode_from(&oid(data)).unwrap()),
            attr(
                "1.2.840.113549.1.9.4",
                Any::encode_from(&OctetString::new(digest.to_vec()).unwrap()).unwrap(),
            ),
        ])
        .unwrap();
        let signature = self.sign(&attrs.to_der().unwrap());
        let si = SignerInfo {
            version: cms::content_info::CmsVersion::V1,
            sid: SignerIdentifier::IssuerAndSerialNumber(cms::cert::IssuerAndSerialNumber {
                issuer: cert.tbs_certificate.issuer.clone(),
                serial_number: cert.tbs_certificate.serial_number.clone(),
            }),
            digest_alg: alg("2.16.840.1.101.3.4.2.1", false),
            signed_attrs: Some(attrs),
            signature_algorithm: alg("1.2.840.113549.1.1.1", true),
            signature: OctetString::new(signature).unwrap(),
            unsigned_attrs: None,
        };
        let sd = SignedData {
            version: cms::content_info::CmsVersion::V1,
            digest_algorithms: SetOfVec::try_from(vec![alg("2.16.840.1.101.3.4.2.1", false)]).unwrap(),
            encap_content_info: EncapsulatedContentInfo {
                econtent_type: oid(data),
                econtent: Some(Any::encode_from(&OctetString::new(content.to_vec()).unwrap()).unwrap()),
            },
            certificates: None,
            crls: None,
            signer_infos: SignerInfos(SetOfVec::try_from(vec![si]).unwrap()),
        };
        cms::content_info::ContentInfo {
            content_type: oid("1.2.840.113549.1.7.2"),
            content: Any::encode_from(&sd).unwrap(),
        }
        .to_der()
        .unwrap()
    }
}

fn iid_document(pending: i64) -> Value {
    let t = time::OffsetDateTime::from_unix_timestamp(pending).unwrap();
    let pending_time = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    json!({
        "accountId": "123456789012", "architecture": "x86_64", "availabilityZone": "eu-west-1a",
        "imageId": "ami-0abcdef1234567890", "instanceId": "i-0aaa", "instanceType": "m5.large",
        "pendingTime": pending_time, "privateIp": "10.0.1.17", "region": "eu-west-1", "version": "2017-09-30",
    })
}

#[test]
fn aws_iid_refuses_garbage_cleanly() {
    let region = AwsRegion::new();
    let registry = registry(vec![json!({
        "name": "fuzz-aws", "method": "aws_iid", "certificates": region.cert_pem,
        "settings": {"max_age_seconds": 3600},
    })]);
    let document = iid_document(now() - 60);
    let text = document.to_string();
    let pkcs7 = b64(region.pkcs7(text.as_bytes()));
    let seeds = vec![
        json!({"document": text, "signature": b64(region.sign(text.as_bytes()))}).to_string(),
        json!({"pkcs7": pkcs7}).to_string(),
        json!({"pkcs7": pkcs7, "document": text}).to_string(),
    ];
    // Documents the region really signed, with mutated content.
    let signed: Signer = Box::new(move |rng: &mut Rng| {
        let text = if rng.one_in(4) {
            let mut bytes = text.clone().into_bytes();
            mutate_bytes(rng, &mut bytes, &[]);
            String::from_utf8_lossy(&bytes).into_owned()
        } else {
            let mut doc = Doc::new(document.clone());
            for _ in 0..1 + rng.below(3) {
                mutate_json(rng, &mut doc);
            }
            doc.render()
        };
        Some(if rng.one_in(2) {
            json!({"document": text, "signature": b64(region.sign(text.as_bytes()))}).to_string()
        } else {
            json!({"pkcs7": b64(region.pkcs7(text.as_bytes()))}).to_string()
        })
    });
    fuzz(Target {
        method: "aws_iid",
        registry,
        context: context(),
        seeds,
        signed: Some(signed),
        accepts: None,
    });
}

/// A software attestation key standing in for a TPM's: it signs quotes
/// (and, unlike a restricted TPM key, anything else, which lets the test
/// reach the host's TPMS_ATTEST parser with signed garbage).
struct Ak {
    key: EcdsaKeyPair,
    /// TPM2B_PUBLIC.
    public: Vec<u8>,
}

impl Ak {
    fn new() -> Self {
        use castellan_tpm::wire::{self, attributes};
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let point = key.public_key().as_ref().to_vec();
        // The TCG AK template: fixedTPM, fixedParent, sensitiveDataOrigin,
        // userWithAuth, restricted, sign; ECDSA-SHA256 on P-256.
        let attrs = attributes::FIXED_TPM
            | attributes::FIXED_PARENT
            | attributes::SENSITIVE_DATA_ORIGIN
            | (1 << 6)
            | attributes::RESTRICTED
            | attributes::SIGN;
        let mut t = Vec::new();
        t.extend_from_slice(&wire::ALG_ECC.to_be_bytes());
        t.extend_from_slice(&wire::ALG_SHA256.to_be_bytes());
        t.extend_from_slice(&attrs.to_be_bytes());
        t.extend_from_slice(&[0, 0]);
        t.extend_from_slice(&wire::ALG_NULL.to_be_bytes());
        t.extend_from_slice(&wire::ALG_ECDSA.to_be_bytes());
        t.extend_from_slice(&wire::ALG_SHA256.to_be_bytes());
        t.extend_from_slice(&wire::ECC_NIST_P256.to_be_bytes());
        t.extend_from_slice(&wire::ALG_NULL.to_be_bytes());
        t.extend_from_slice(&wire::tpm2b(&point[1..33]).unwrap());
        t.extend_from_slice(&wire::tpm2b(&point[33..65]).unwrap());
        Self {
            key,
            public: wire::tpm2b(&t).unwrap(),
        }
    }

    /// A TPMT_SIGNATURE (ECDSA-SHA256) over `message`.
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        use castellan_tpm::wire;
        let rs = self.key.sign(&SystemRandom::new(), message).unwrap();
        let rs = rs.as_ref();
        let mut s = Vec::new();
        s.extend_from_slice(&wire::ALG_ECDSA.to_be_bytes());
        s.extend_from_slice(&wire::ALG_SHA256.to_be_bytes());
        s.extend_from_slice(&wire::tpm2b(&rs[..32]).unwrap());
        s.extend_from_slice(&wire::tpm2b(&rs[32..]).unwrap());
        s
    }
}

/// A TPMS_ATTEST quote over the SHA-256 PCRs `pcrs` (ascending), with
/// `qualifying` as extraData.
fn quote_attest(qualifying: &[u8], pcrs: &BTreeMap<u32, Vec<u8>>) -> Vec<u8> {
    use castellan_tpm::wire;
    let mut bitmap = vec![0u8; 3];
    for i in pcrs.keys() {
        let (byte, bit) = ((*i / 8) as usize, i % 8);
        if byte >= bitmap.len() {
            bitmap.resize(byte + 1, 0);
        }
        bitmap[byte] |= 1 << bit;
    }
    let digest = wire::pcr_digest(wire::ALG_SHA256, pcrs.values().map(Vec::as_slice)).unwrap();
    let mut a = Vec::new();
    a.extend_from_slice(&wire::TPM_GENERATED_VALUE.to_be_bytes());
    a.extend_from_slice(&wire::ST_ATTEST_QUOTE.to_be_bytes());
    a.extend_from_slice(&wire::tpm2b(&[0x00, 0x0b, 1, 2, 3]).unwrap());
    a.extend_from_slice(&wire::tpm2b(qualifying).unwrap());
    a.extend_from_slice(&1234u64.to_be_bytes());
    a.extend_from_slice(&5u32.to_be_bytes());
    a.extend_from_slice(&6u32.to_be_bytes());
    a.push(1);
    a.extend_from_slice(&0x2019_1023u64.to_be_bytes());
    a.extend_from_slice(&1u32.to_be_bytes());
    a.extend_from_slice(&wire::ALG_SHA256.to_be_bytes());
    a.push(bitmap.len() as u8);
    a.extend_from_slice(&bitmap);
    a.extend_from_slice(&wire::tpm2b(&digest).unwrap());
    a
}

#[test]
fn tpm_refuses_garbage_cleanly() {
    let manufacturer = Pki::new("Fuzz TPM Manufacturer CA");
    let ek_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ek_cert = manufacturer
        .issue(
            rcgen::CertificateParams::new(Vec::<String>::new()).unwrap(),
            &ek_key,
        )
        .unwrap();
    let ak = Ak::new();
    let secret = crate::util::random_bytes::<32>();
    let pcr0 = crate::util::random_bytes::<32>().to_vec();
    let mut extra = Map::new();
    extra.insert("secret_sha256".into(), crate::util::sha256_hex(&secret).into());
    extra.insert("ek_certificate".into(), b64(ek_cert.der()).into());
    extra.insert(
        "ek_public_sha256".into(),
        crate::util::sha256_hex(b"ek public").into(),
    );
    extra.insert("ak_public".into(), b64(&ak.public).into());
    let (context, id, nonce) = challenge_context(extra);
    let registry = registry(vec![json!({
        "name": "fuzz-tpm", "method": "tpm", "certificates": manufacturer.ca.pem(),
        "settings": {"pcr_policy": {"0": hex::encode(&pcr0)}},
    })]);
    // Bound to the certified key: SHA-256(nonce || SHA-256(SPKI)).
    let mut qualifying = STANDARD.decode(&nonce).unwrap();
    qualifying.extend_from_slice(&hex::decode(key_sha256()).unwrap());
    let qualifying = crate::util::sha256_hex(&qualifying);
    let qualifying = hex::decode(qualifying).unwrap();
    let evidence = move |attest: &[u8], pcrs: &BTreeMap<u32, Vec<u8>>| {
        let pcrs: Map<String, Value> = pcrs
            .iter()
            .map(|(i, v)| (i.to_string(), hex::encode(v).into()))
            .collect();
        json!({
            "challenge_id": id, "activated_secret": b64(secret), "attest": b64(attest),
            "signature": b64(ak.sign(attest)), "pcrs": pcrs,
        })
        .to_string()
    };
    let pcrs: BTreeMap<u32, Vec<u8>> = BTreeMap::from([(0, pcr0.clone()), (7, vec![7; 32])]);
    let genuine_attest = quote_attest(&qualifying, &pcrs);
    let seeds = vec![evidence(&genuine_attest, &pcrs)];

    let signed: Signer = Box::new(move |rng: &mut Rng| {
        Some(match rng.below(3) {
            0 => {
                // A consistent quote over random PCRs (of random widths),
                // sometimes given with a PCR more or less than quoted.
                let mut pcrs = BTreeMap::new();
                if rng.one_in(2) {
                    pcrs.insert(0, pcr0.clone());
                }
                for _ in 0..rng.below(8) {
                    let top = if rng.one_in(4) { 40 } else { 24 };
                    let i = rng.below(top) as u32;
                    let width = if rng.one_in(4) { rng.below(70) } else { 32 };
                    pcrs.insert(i, rng.bytes(width));
                }
                let attest = quote_attest(&qualifying, &pcrs);
                if rng.one_in(4) {
                    let n = pcrs.len();
                    if n > 0 && rng.one_in(2) {
                        let i = *pcrs.keys().nth(rng.below(n)).unwrap_or(&0);
                        pcrs.remove(&i);
                    } else {
                        pcrs.insert(rng.below(24) as u32, rng.bytes(32));
                    }
                }
                evidence(&attest, &pcrs)
            }
            1 => {
                // Signed garbage: the host parses TPMS_ATTEST only once the
                // signature verifies.
                let mut attest = genuine_attest.clone();
                for _ in 0..1 + rng.below(4) {
                    mutate_bytes(rng, &mut attest, &[]);
                }
                evidence(&attest, &pcrs)
            }
            _ => {
                let len = rng.length();
                evidence(&rng.bytes(len), &pcrs)
            }
        })
    });
    fuzz(Target {
        method: "tpm",
        registry,
        context,
        seeds,
        signed: Some(signed),
        accepts: None,
    });
}
