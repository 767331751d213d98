//! Runs a bundle's Rego unit tests: every rule named `test_*` in a
//! `*_test.rego` file passes when it evaluates to `true`, as with `opa test`.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{BundleFiles, PolicyError};

/// One test's result.
#[derive(Debug, Clone, PartialEq)]
pub enum TestOutcome {
    Pass,
    /// Undefined or false.
    Fail,
    /// Evaluation raised an error.
    Error(String),
}

/// All tests of a bundle.
#[derive(Debug, Clone)]
pub struct TestReport {
    /// (`data.<package>.<rule>`, outcome, time taken).
    pub results: Vec<(String, TestOutcome, Duration)>,
}

impl TestReport {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.1 == TestOutcome::Pass).count()
    }

    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }
}

/// Loads `dir` with its tests and runs them.
pub fn run_tests(dir: &Path) -> Result<TestReport, PolicyError> {
    let files = BundleFiles::from_dir(dir, true)?;
    let loaded = files.compile()?;
    let mut results = Vec::new();
    for (name, text) in files.rego.iter().filter(|(n, _)| n.ends_with("_test.rego")) {
        let package = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("package "))
            .map(|p| p.trim().to_owned())
            .ok_or_else(|| PolicyError::Compile {
                file: name.clone(),
                message: "no package".into(),
            })?;
        let mut seen = std::collections::BTreeSet::new();
        for rule in text.lines().filter_map(test_rule_name) {
            if !seen.insert(rule.clone()) {
                continue;
            }
            let path = format!("data.{package}.{rule}");
            let mut engine = loaded.engine.clone();
            let started = Instant::now();
            let outcome = match engine.eval_rule(path.clone()) {
                Ok(regorus::Value::Bool(true)) => TestOutcome::Pass,
                Ok(_) => TestOutcome::Fail,
                Err(e) => TestOutcome::Error(e.to_string()),
            };
            results.push((path, outcome, started.elapsed()));
        }
    }
    Ok(TestReport { results })
}

/// `test_foo if {` or `test_foo {` at the start of a line.
fn test_rule_name(line: &str) -> Option<String> {
    let rest = line.strip_prefix("test_")?;
    let ident: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    Some(format!("test_{ident}"))
}
