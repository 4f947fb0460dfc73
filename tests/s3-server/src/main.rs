//! A real S3 server for imprint's tests: s3s (the S3 protocol, SigV4 header and presigned-URL
//! checking, expiry included) over s3s-fs (objects as files under ROOT/BUCKET/KEY), with the
//! access rule of a netboot bucket: anonymous `GET`/`HEAD` of objects (public read, like
//! MinIO's `download` policy or an AWS bucket policy granting `s3:GetObject`), everything else
//! only with a valid signature by the one key pair given.
//!
//! `imprint-s3-server ADDR:PORT ROOT ACCESS_KEY SECRET_KEY`; prints `listening on ADDR:PORT`.

use std::net::SocketAddr;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use s3s::{s3_error, S3Result};

/// Public read, signed write.
struct PublicRead;

#[async_trait::async_trait]
impl S3Access for PublicRead {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        if cx.credentials().is_some() {
            return Ok(());
        }
        match cx.s3_op().name() {
            "GetObject" | "HeadObject" => Ok(()),
            op => Err(s3_error!(AccessDenied, "{op} needs a signature")),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, root, ak, sk] = args.as_slice() else {
        return Err("usage: imprint-s3-server ADDR:PORT ROOT ACCESS_KEY SECRET_KEY".into());
    };
    let addr: SocketAddr = addr.parse()?;
    let fs = s3s_fs::FileSystem::new(root).map_err(|e| format!("{root}: {e:?}"))?;
    let mut b = S3ServiceBuilder::new(fs);
    b.set_auth(SimpleAuth::from_single(ak.as_str(), sk.as_str()));
    b.set_access(PublicRead);
    let service = b.build();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let (socket, _) = listener.accept().await?;
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
