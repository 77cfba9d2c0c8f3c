// Receivers that verify Herald's signatures, with the secret filled in:
// for each language one with the Standard Webhooks library and one with
// the standard library alone (X-Webhook-Signature, and webhook-signature by
// hand). The console shows them right after create and rotate; the console
// test runs the Python and Node.js ones against a real delivery.

// A string literal in JSON's syntax is one in Python, JavaScript and Go.
const json = (s) => JSON.stringify(s);
// Rust wants \u{..} for control characters.
const rust = (s) => `"${[...s].map((c) => {
  if (c === '\\' || c === '"') return `\\${c}`;
  const n = c.codePointAt(0);
  return n < 0x20 || n === 0x7f ? `\\u{${n.toString(16)}}` : c;
}).join('')}"`;

export function samples(secret) {
  // A secret Herald generated is `whsec_<base64>`: libraries decode it. A
  // secret the tenant chose is used as its bytes, which libraries take raw.
  const generated = /^whsec_[A-Za-z0-9+/]+={0,2}$/.test(secret);
  return [
    {
      language: 'Python',
      variants: [
        {
          title: 'Standard Webhooks library',
          file: 'receiver.py',
          install: 'pip install standardwebhooks',
          code: `# A receiver that verifies Herald's webhook-signature with the Standard
# Webhooks library. Run: pip install standardwebhooks && python3 receiver.py
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

from standardwebhooks.webhooks import Webhook

# Shown once by Herald: keep it in your secret store, not in code.
SECRET = ${json(secret)}
webhook = Webhook(${generated ? 'SECRET' : 'SECRET.encode()'})


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            # Checks the signature and the timestamp (5 minutes' tolerance);
            # answers the JSON body.
            event = webhook.verify(body, dict(self.headers))
        except Exception:
            self.send_response(401)
            self.end_headers()
            return
        # Deliveries are at least once: deduplicate on webhook-id.
        print("verified", self.headers["webhook-id"], event["type"], flush=True)
        self.send_response(204)
        self.end_headers()


HTTPServer(("", int(os.environ.get("PORT", "8000"))), Handler).serve_forever()
`,
        },
        {
          title: 'standard library only',
          file: 'receiver.py',
          code: `# A receiver that verifies Herald's signatures with Python's standard
# library only: X-Webhook-Signature (HMAC of the body) and webhook-signature
# (Standard Webhooks). Run: python3 receiver.py
import base64
import binascii
import hashlib
import hmac
import os
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

# Shown once by Herald: keep it in your secret store, not in code.
SECRET = ${json(secret)}


def standard_key(secret):
    # Standard Webhooks signs with the base64-decoded part after "whsec_";
    # a secret of your own is used as its UTF-8 bytes.
    if secret.startswith("whsec_"):
        try:
            key = base64.b64decode(secret[len("whsec_"):], validate=True)
            if key:
                return key
        except binascii.Error:
            pass
    return secret.encode()


def verified(headers, body):
    # X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the raw body>,
    # keyed by the secret exactly as shown.
    mac = hmac.new(SECRET.encode(), body, hashlib.sha256)
    if not hmac.compare_digest(headers.get("X-Webhook-Signature", ""), "sha256=" + mac.hexdigest()):
        return False
    # webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">, one
    # per live secret (several while a rotation overlaps).
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > 300:
        return False
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(standard_key(SECRET), signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(s, expected) for s in headers.get("webhook-signature", "").split())


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not verified(self.headers, body):
            self.send_response(401)
            self.end_headers()
            return
        # The body is JSON (or XML, as the webhook's format says).
        # Deliveries are at least once: deduplicate on webhook-id.
        print("verified", self.headers["webhook-id"], flush=True)
        self.send_response(204)
        self.end_headers()


HTTPServer(("", int(os.environ.get("PORT", "8000"))), Handler).serve_forever()
`,
        },
      ],
    },
    {
      language: 'Node.js',
      variants: [
        {
          title: 'Standard Webhooks library',
          file: 'receiver.js',
          install: 'npm install standardwebhooks',
          code: `// A receiver that verifies Herald's webhook-signature with the Standard
// Webhooks library. Run: npm install standardwebhooks && node receiver.js
const http = require("node:http");
const { Webhook } = require("standardwebhooks");

// Shown once by Herald: keep it in your secret store, not in code.
const SECRET = ${json(secret)};
const webhook = new Webhook(SECRET${generated ? '' : ', { format: "raw" }'});

http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const body = Buffer.concat(chunks).toString("utf8");
    try {
      // Checks the signature and the timestamp (5 minutes' tolerance).
      webhook.verify(body, req.headers, { jsonParse: false });
    } catch {
      res.writeHead(401).end();
      return;
    }
    // The body is JSON (or XML, as the webhook's format says).
    // Deliveries are at least once: deduplicate on webhook-id.
    console.log("verified", req.headers["webhook-id"]);
    res.writeHead(204).end();
  });
}).listen(Number(process.env.PORT || 8000));
`,
        },
        {
          title: 'standard library only',
          file: 'receiver.js',
          code: `// A receiver that verifies Herald's signatures with Node's standard
// library only: X-Webhook-Signature (HMAC of the body) and webhook-signature
// (Standard Webhooks). Run: node receiver.js
const crypto = require("node:crypto");
const http = require("node:http");

// Shown once by Herald: keep it in your secret store, not in code.
const SECRET = ${json(secret)};

// Standard Webhooks signs with the base64-decoded part after "whsec_"; a
// secret of your own is used as its UTF-8 bytes.
function standardKey(secret) {
  const b64 = secret.startsWith("whsec_") ? secret.slice(6) : "";
  if (/^[A-Za-z0-9+/]+={0,2}$/.test(b64) && b64.length % 4 === 0) return Buffer.from(b64, "base64");
  return Buffer.from(secret, "utf8");
}

const same = (a, b) => a.length === b.length && crypto.timingSafeEqual(Buffer.from(a), Buffer.from(b));

function verified(headers, body) {
  // X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the raw body>, keyed by
  // the secret exactly as shown.
  const bodyMac = "sha256=" + crypto.createHmac("sha256", SECRET).update(body).digest("hex");
  if (!same(headers["x-webhook-signature"] || "", bodyMac)) return false;
  // webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">, one
  // per live secret (several while a rotation overlaps).
  const id = headers["webhook-id"] || "";
  const timestamp = headers["webhook-timestamp"] || "";
  if (!/^[0-9]+$/.test(timestamp) || Math.abs(Date.now() / 1000 - Number(timestamp)) > 300) return false;
  const mac = crypto.createHmac("sha256", standardKey(SECRET))
    .update(\`\${id}.\${timestamp}.\`).update(body).digest("base64");
  return (headers["webhook-signature"] || "").split(" ").some((s) => same(s, "v1," + mac));
}

http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const body = Buffer.concat(chunks);
    if (!verified(req.headers, body)) {
      res.writeHead(401).end();
      return;
    }
    // The body is JSON (or XML, as the webhook's format says).
    // Deliveries are at least once: deduplicate on webhook-id.
    console.log("verified", req.headers["webhook-id"]);
    res.writeHead(204).end();
  });
}).listen(Number(process.env.PORT || 8000));
`,
        },
      ],
    },
    {
      language: 'Go',
      variants: [
        {
          title: 'Standard Webhooks library',
          file: 'main.go',
          install: 'go get github.com/standard-webhooks/standard-webhooks/libraries',
          code: `// A receiver that verifies Herald's webhook-signature with the Standard
// Webhooks library. Run: go run main.go
package main

import (
	"io"
	"log"
	"net/http"
	"os"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
)

// Shown once by Herald: keep it in your secret store, not in code.
const secret = ${json(secret)}

func main() {
	wh, err := ${generated ? 'standardwebhooks.NewWebhook(secret)' : 'standardwebhooks.NewWebhookRaw([]byte(secret))'}
	if err != nil {
		log.Fatal(err)
	}
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		// Checks the signature and the timestamp (5 minutes' tolerance).
		if err != nil || wh.Verify(body, r.Header) != nil {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		// Deliveries are at least once: deduplicate on webhook-id.
		log.Println("verified", r.Header.Get("webhook-id"))
		w.WriteHeader(http.StatusNoContent)
	})
	port := os.Getenv("PORT")
	if port == "" {
		port = "8000"
	}
	log.Fatal(http.ListenAndServe(":"+port, nil))
}
`,
        },
        {
          title: 'standard library only',
          file: 'main.go',
          code: `// A receiver that verifies Herald's signatures with Go's standard library
// only: X-Webhook-Signature (HMAC of the body) and webhook-signature
// (Standard Webhooks). Run: go run main.go
package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"io"
	"log"
	"math"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

// Shown once by Herald: keep it in your secret store, not in code.
const secret = ${json(secret)}

// standardKey is what Standard Webhooks signs with: the base64-decoded part
// after "whsec_"; a secret of your own is used as its bytes.
func standardKey() []byte {
	if b64, ok := strings.CutPrefix(secret, "whsec_"); ok {
		if key, err := base64.StdEncoding.DecodeString(b64); err == nil && len(key) > 0 {
			return key
		}
	}
	return []byte(secret)
}

func sign(key []byte, parts ...[]byte) []byte {
	mac := hmac.New(sha256.New, key)
	for _, p := range parts {
		mac.Write(p)
	}
	return mac.Sum(nil)
}

func verified(h http.Header, body []byte) bool {
	// X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the raw body>, keyed
	// by the secret exactly as shown.
	bodyMac := "sha256=" + hex.EncodeToString(sign([]byte(secret), body))
	if !hmac.Equal([]byte(h.Get("X-Webhook-Signature")), []byte(bodyMac)) {
		return false
	}
	// webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">,
	// one per live secret (several while a rotation overlaps).
	id, ts := h.Get("webhook-id"), h.Get("webhook-timestamp")
	unix, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || math.Abs(float64(time.Now().Unix()-unix)) > 300 {
		return false
	}
	expected := "v1," + base64.StdEncoding.EncodeToString(sign(standardKey(), []byte(id+"."+ts+"."), body))
	for _, s := range strings.Fields(h.Get("webhook-signature")) {
		if hmac.Equal([]byte(s), []byte(expected)) {
			return true
		}
	}
	return false
}

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil || !verified(r.Header, body) {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		// Deliveries are at least once: deduplicate on webhook-id.
		log.Println("verified", r.Header.Get("webhook-id"))
		w.WriteHeader(http.StatusNoContent)
	})
	port := os.Getenv("PORT")
	if port == "" {
		port = "8000"
	}
	log.Fatal(http.ListenAndServe(":"+port, nil))
}
`,
        },
      ],
    },
    {
      language: 'Rust',
      variants: [
        {
          title: 'Standard Webhooks library',
          file: 'src/verify.rs',
          install: 'cargo add standardwebhooks http',
          code: `// Verifies Herald's webhook-signature with the Standard Webhooks crate.
// Call it from your HTTP handler with the request's headers and raw body;
// answer 401 when it returns false.
use standardwebhooks::Webhook;

// Shown once by Herald: keep it in your secret store, not in code.
const SECRET: &str = ${rust(secret)};

pub fn verified(headers: &http::HeaderMap, body: &[u8]) -> bool {
    ${generated ? 'let Ok(webhook) = Webhook::new(SECRET) else {' : 'let Ok(webhook) = Webhook::from_bytes(SECRET.as_bytes().to_vec()) else {'}
        return false;
    };
    // Checks the signature and the timestamp (5 minutes' tolerance).
    // Deliveries are at least once: deduplicate on webhook-id.
    webhook.verify(body, headers).is_ok()
}
`,
        },
        {
          title: 'hmac and sha2 crates',
          file: 'src/verify.rs',
          install: 'cargo add hmac sha2 hex base64 http',
          code: `// Verifies Herald's signatures with the hmac and sha2 crates:
// X-Webhook-Signature (HMAC of the body) and webhook-signature (Standard
// Webhooks). Call it from your HTTP handler with the request's headers and
// raw body; answer 401 when it returns false.
use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

// Shown once by Herald: keep it in your secret store, not in code.
const SECRET: &str = ${rust(secret)};

fn mac(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("any key length")
}

/// What Standard Webhooks signs with: the base64-decoded part after
/// "whsec_"; a secret of your own is used as its bytes.
fn standard_key() -> Vec<u8> {
    SECRET
        .strip_prefix("whsec_")
        .and_then(|b64| STANDARD.decode(b64).ok())
        .filter(|key| !key.is_empty())
        .unwrap_or_else(|| SECRET.as_bytes().to_vec())
}

pub fn verified(headers: &http::HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    // X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the raw body>, keyed
    // by the secret exactly as shown.
    let Some(hex_mac) = header("x-webhook-signature").strip_prefix("sha256=") else {
        return false;
    };
    let Ok(body_mac) = hex::decode(hex_mac) else {
        return false;
    };
    let mut m = mac(SECRET.as_bytes());
    m.update(body);
    if m.verify_slice(&body_mac).is_err() {
        return false;
    }
    // webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">,
    // one per live secret (several while a rotation overlaps).
    let (id, timestamp) = (header("webhook-id"), header("webhook-timestamp"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    match timestamp.parse::<i64>() {
        Ok(ts) if (now - ts).abs() <= 300 => {}
        _ => return false,
    }
    header("webhook-signature").split(' ').any(|s| {
        let Some(Ok(sig)) = s.strip_prefix("v1,").map(|b64| STANDARD.decode(b64)) else {
            return false;
        };
        let mut m = mac(&standard_key());
        m.update(format!("{id}.{timestamp}.").as_bytes());
        m.update(body);
        m.verify_slice(&sig).is_ok()
    })
}
`,
        },
      ],
    },
  ];
}
