//! The side channel: files the source uploads into a prepared migration's image directory,
//! bounded by `[qemu] max_upload_bytes`, checked against their announced size and sha256, and
//! never over an existing file.

use std::path::PathBuf;

use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::Incoming;
use crate::destination::paths;
use crate::rpc::{FileHeader, MethodError, Session, Upload};

/// Removes a file when dropped (a partial upload).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Incoming {
    pub(super) async fn receive_file(&self, session: &Session, header: FileHeader, mut upload: Upload) -> Result<serde_json::Value, MethodError> {
        let dir = {
            let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            let p = active
                .get(&header.migration)
                .ok_or_else(|| MethodError::bad_request(format!("no migration {} here", header.migration)))?;
            if p.source != session.peer.name() {
                return Err(MethodError::refused(403, "not-its-source", "another host's migration"));
            }
            self.images_of(&header.migration)
        };
        migtun_proxy::route::wire::validate_name(&header.name)
            .map_err(|why| MethodError::bad_request(format!("file name {:?}: {why}", header.name)))?;
        let limit = self.limits.max_upload_bytes;
        let too_large = |what: String| {
            MethodError::refused(413, "upload-too-large", format!("{}: {what}, more than [qemu] max_upload_bytes = {limit} of {}", header.name, self.agent.name()))
        };
        if header.size > limit {
            return Err(too_large(format!("{} bytes announced", header.size)));
        }
        // Plain (no `.`/`..`), and never over an existing file (a disk image, an earlier upload).
        let dest = paths::file_in(&dir, &header.name, "uploaded file").map_err(|e| MethodError::forbidden(e.to_string()))?;
        if std::fs::symlink_metadata(&dest).is_ok() {
            return Err(MethodError::forbidden(format!("{}: exists already; the destination never overwrites a file", header.name)));
        }
        let tmp = dir.join(format!(".{}.partial", header.name));
        // Whatever ends the upload early (a refusal, a reset stream, a full disk), the partial
        // file goes.
        let partial = RemoveOnDrop(Some(tmp.clone()));
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await
            .map_err(|e| MethodError::failed(format!("{}: {e}", tmp.display())))?;
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = upload.chunk().await {
            let chunk = chunk.map_err(|e| MethodError::failed(format!("receiving {}: {e}", header.name)))?;
            n += chunk.len() as u64;
            if n > limit {
                return Err(too_large(format!("more than {limit} bytes sent")));
            }
            if n > header.size {
                return Err(MethodError::bad_request(format!("{}: more than the announced {} bytes", header.name, header.size)));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| MethodError::failed(format!("{}: {e}", tmp.display())))?;
        }
        file.sync_all().await.map_err(|e| MethodError::failed(e.to_string()))?;
        let sha = hex::encode(hasher.finalize());
        if n != header.size || sha != header.sha256 {
            return Err(MethodError::bad_request(format!("{}: received {n} bytes with sha256 {sha}, expected {} bytes {}", header.name, header.size, header.sha256)));
        }
        // A link, not a rename: it fails instead of replacing a file already there.
        std::fs::hard_link(&tmp, &dest).map_err(|e| MethodError::bad_request(format!("{}: {e}", dest.display())))?;
        drop(partial);
        Ok(json!({ "path": dest, "bytes": n, "sha256": sha }))
    }
}
