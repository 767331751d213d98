//! A small W3C WebDriver client over `chromedriver` and headless Chromium
//! (Debian's `chromium` and `chromium-driver`, installed by
//! scripts/setup.sh): sessions, navigation, elements, scripts, cookies.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The key W3C WebDriver names element references with.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A running `chromedriver`, killed on drop.
pub struct Driver {
    child: Child,
    base: String,
    agent: ureq::Agent,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (scripts/setup.sh installs chromium-driver)");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = agent
                .get(&format!("{base}/status"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, base, agent }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let mut resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, body) => self.agent.post(&url).send_json(body.unwrap_or_else(|| json!({}))),
        }
        .expect("chromedriver answers");
        let status = resp.status().as_u16();
        let v: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
        assert!(status < 400, "WebDriver {method} {path}: {status} {v}");
        v["value"].clone()
    }

    /// A new headless browser with its own profile (its own cookies).
    pub fn session(&self, profile: &Path) -> Session<'_> {
        let browser = if Path::new("/usr/lib/chromium/chromium").exists() {
            "/usr/lib/chromium/chromium"
        } else {
            "/usr/bin/chromium"
        };
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": browser,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let v = self.call("POST", "/session", Some(caps));
        Session {
            driver: self,
            id: v["sessionId"].as_str().expect("a session id").to_owned(),
        }
    }
}

/// One browser, deleted on drop.
pub struct Session<'a> {
    driver: &'a Driver,
    id: String,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = self
            .driver
            .agent
            .delete(&format!("{}/session/{}", self.driver.base, self.id))
            .call();
    }
}

/// An element reference.
#[derive(Clone)]
pub struct Element(String);

impl Session<'_> {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.driver
            .call(method, &format!("/session/{}{path}", self.id), body)
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn url(&self) -> String {
        self.call("GET", "/url", None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs `script` in the page; returns what it returns.
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// The first element matching a CSS selector, if any.
    pub fn try_find(&self, css: &str) -> Option<Element> {
        let v = self.execute("return document.querySelector(arguments[0]);", vec![json!(css)]);
        v.get(ELEMENT)
            .and_then(Value::as_str)
            .map(|id| Element(id.to_owned()))
    }

    /// Waits up to `timeout` for `f` to hold, polling.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; page text: {}",
                self.execute("return document.body.innerText;", vec![])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for a visible element matching `css`.
    pub fn find(&self, css: &str) -> Element {
        let mut found = None;
        self.wait_until(&format!("`{css}`"), Duration::from_secs(20), |s| {
            found = s.try_find(css).filter(|e| s.displayed(e));
            found.is_some()
        });
        found.expect("found")
    }

    pub fn displayed(&self, e: &Element) -> bool {
        self.call("GET", &format!("/element/{}/displayed", e.0), None) == true
    }

    pub fn click(&self, e: &Element) {
        self.call("POST", &format!("/element/{}/click", e.0), Some(json!({})));
    }

    pub fn type_into(&self, e: &Element, text: &str) {
        self.call(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": text })),
        );
    }

    pub fn text(&self, e: &Element) -> String {
        self.call("GET", &format!("/element/{}/text", e.0), None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The text of the element matching `css` (empty when there is none).
    pub fn text_of(&self, css: &str) -> String {
        self.try_find(css).map(|e| self.text(&e)).unwrap_or_default()
    }

    /// Waits until the element matching `css` shows text containing `needle`.
    pub fn wait_for_text(&self, css: &str, needle: &str, timeout: Duration) {
        self.wait_until(&format!("`{needle}` in `{css}`"), timeout, |s| {
            s.text_of(css).contains(needle)
        });
    }

    /// The browser's cookies for the current page, by name.
    pub fn cookie(&self, name: &str) -> Option<Value> {
        self.call("GET", "/cookie", None)
            .as_array()?
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
    }
}
