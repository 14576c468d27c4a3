//! Test clients: reqwest trusting the simulator's CA, and a raw TLS client that shows the
//! exact status line.

use std::sync::Arc;
use std::time::Duration;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use pve_sim::{SimConfig, Simulator};
use reqwest::Method;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;

/// Bound for every wait in these tests.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// An ISO-looking payload: `CD001` at byte 32769.
pub(crate) fn iso_bytes(fill: u8) -> Vec<u8> {
    let mut data = vec![fill; 36 * 1024];
    data[32769..32774].copy_from_slice(b"CD001");
    data
}

/// One response, with the reason phrase hyper kept.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) reason: Option<String>,
    pub(crate) body: String,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    pub(crate) fn data(&self) -> Value {
        self.json()["data"].clone()
    }

    pub(crate) fn message(&self) -> String {
        self.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub(crate) fn error(&self, param: &str) -> String {
        self.json()["errors"][param]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub(crate) fn upid(&self) -> String {
        assert_eq!(self.status, 200, "expected a UPID: {self:?}");
        self.data().as_str().expect("UPID string").to_owned()
    }

    #[track_caller]
    pub(crate) fn ok(self) -> Self {
        assert_eq!(self.status, 200, "unexpected failure: {self:?}");
        self
    }
}

/// reqwest pointed at a simulator.
pub(crate) struct Api {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) auth: Option<String>,
}

pub(crate) fn http_client(sim: &Simulator) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(sim.ca_pem().as_bytes()).expect("CA parses");
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .build()
        .expect("client builds")
}

pub(crate) async fn start(config: SimConfig) -> (Simulator, Api) {
    let sim = pve_sim::start(config).await.expect("simulator starts");
    let api = Api {
        http: http_client(&sim),
        base: sim.base_url(),
        auth: Some(sim.authorization()),
    };
    (sim, api)
}

pub(crate) fn encode(segment: &str) -> String {
    utf8_percent_encode(segment, NON_ALPHANUMERIC).to_string()
}

impl Api {
    pub(crate) async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let request = match &self.auth {
            Some(auth) => request.header("Authorization", auth),
            None => request,
        };
        let response = timeout(WAIT, request.send())
            .await
            .expect("request within the bound")
            .expect("request succeeds at the HTTP level");
        let status = response.status().as_u16();
        let reason = response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
        let body = response.text().await.expect("body reads");
        Reply {
            status,
            reason,
            body,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        form: &[(&str, &str)],
    ) -> Reply {
        let mut request = self.http.request(method, self.url(path)).query(query);
        if !form.is_empty() {
            request = request.form(form);
        }
        self.send(request).await
    }

    pub(crate) async fn get(&self, path: &str, query: &[(&str, &str)]) -> Reply {
        self.call(Method::GET, path, query, &[]).await
    }

    pub(crate) async fn post(&self, path: &str, form: &[(&str, &str)]) -> Reply {
        self.call(Method::POST, path, &[], form).await
    }

    pub(crate) async fn put(&self, path: &str, form: &[(&str, &str)]) -> Reply {
        self.call(Method::PUT, path, &[], form).await
    }

    pub(crate) async fn delete(&self, path: &str, query: &[(&str, &str)]) -> Reply {
        self.call(Method::DELETE, path, query, &[]).await
    }

    pub(crate) async fn upload(
        &self,
        storage: &str,
        content: &str,
        filename: &str,
        data: Vec<u8>,
    ) -> Reply {
        let part = reqwest::multipart::Part::bytes(data)
            .file_name(filename.to_owned())
            .mime_str("application/octet-stream")
            .expect("mime parses");
        let form = reqwest::multipart::Form::new()
            .text("content", content.to_owned())
            .part("filename", part);
        let url = self.url(&format!("/nodes/pve/storage/{storage}/upload"));
        self.send(self.http.post(url).multipart(form)).await
    }

    /// Polls a task until it stopped; tolerates the early `no such task`.
    pub(crate) async fn wait_task(&self, upid: &str) -> Value {
        let node = upid.split(':').nth(1).expect("UPID has a node");
        let path = format!("/nodes/{node}/tasks/{}/status", encode(upid));
        let deadline = Instant::now() + WAIT;
        loop {
            let reply = self.get(&path, &[]).await;
            if reply.status == 200 && reply.data()["status"] == "stopped" {
                return reply.data();
            }
            assert!(
                reply.status == 200 || reply.error("upid") == "no such task",
                "unexpected task status reply: {reply:?}"
            );
            assert!(Instant::now() < deadline, "task {upid} did not finish");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub(crate) async fn task_log(&self, upid: &str, query: &[(&str, &str)]) -> Reply {
        let node = upid.split(':').nth(1).expect("UPID has a node");
        self.get(&format!("/nodes/{node}/tasks/{}/log", encode(upid)), query)
            .await
    }

    /// Clones the default template to `newid` and waits for the task.
    pub(crate) async fn clone_vm(&self, newid: u32, name: &str) -> Value {
        let newid = newid.to_string();
        let upid = self
            .post(
                "/nodes/pve/qemu/9000/clone",
                &[("newid", &newid), ("name", name)],
            )
            .await
            .upid();
        self.wait_task(&upid).await
    }

    pub(crate) async fn config(&self, vmid: u32) -> Value {
        self.get(&format!("/nodes/pve/qemu/{vmid}/config"), &[])
            .await
            .ok()
            .data()
    }
}

/// Sends raw bytes over TLS and returns everything the server sent back.
pub(crate) async fn raw(sim: &Simulator, request: &[u8]) -> String {
    let (text, _) = raw_with_cert(sim, request).await;
    text
}

/// Like [`raw`], plus the DER of the certificate the server presented.
pub(crate) async fn raw_with_cert(sim: &Simulator, request: &[u8]) -> (String, Vec<u8>) {
    let ca = CertificateDer::from_pem_slice(sim.ca_pem().as_bytes()).expect("CA parses");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("CA is a valid root");
    #[expect(deprecated, reason = "ring is the workspace's one rustls provider")]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(sim.addr()).await.expect("connects");
    let name = ServerName::try_from("127.0.0.1").expect("valid name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    tls.write_all(request).await.expect("request written");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match timeout(WAIT, tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("server did not close the connection"),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), cert)
}

/// The status line of a raw response.
pub(crate) fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or_default()
}

/// The body of a raw response.
pub(crate) fn raw_body(response: &str) -> &str {
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default()
}
