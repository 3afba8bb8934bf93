//! The receiving end of an upload (the sending end is the controller's `agent/upload.rs`): `patchd.v1.Agent/Upload`
//! read straight from the HTTP/2 frames. The wire format is unchanged (gRPC framing, the same protobuf messages, any
//! client works), but chunk data is copied once, from the frames into a 4 KiB-aligned buffer that the hasher reads and
//! the writer hands to direct I/O as it is. Through tonic's decoder each byte was copied twice more: into its decode
//! buffer, then into an aligned buffer for direct I/O. Every other method goes to the tonic service.

use crate::server::{AgentService, blob_from_wire};
use crate::status::invalid_argument;
use crate::transfer::{BlobStore, Chunk, DIRECT_IO_ALIGN, TransferError};
use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use patchd_proto::UPLOAD_PATH;
use patchd_proto::v1::{self, agent_server::AgentServer, upload_message::Kind};
use prost::Message;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;

/// Messages up to this size are decoded whole (headers, small chunks); larger ones field by field.
const SMALL_MESSAGE_BYTES: usize = 64 * 1024;

/// The agent's gRPC routes: the role check ([`crate::access`]) for every call, then Upload here and everything else
/// to the tonic-generated service.
#[derive(Clone)]
pub struct AgentRoutes {
    inner: AgentServer<AgentService>,
    store: Arc<BlobStore>,
}

impl AgentRoutes {
    pub fn new(service: AgentService) -> Self {
        let store = service.store();
        Self {
            inner: service.into_server(),
            store,
        }
    }
}

impl NamedService for AgentRoutes {
    const NAME: &'static str = <AgentServer<AgentService> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for AgentRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<http::Request<Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // Roles are checked here, once, for every method (Upload included) before any handler runs.
        match crate::access::authorize(&request) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
            }
            Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
        }
        if request.uri().path() == UPLOAD_PATH {
            let store = Arc::clone(&self.store);
            Box::pin(async move { Ok(grpc_response(upload(store, request.into_body()).await)) })
        } else {
            self.inner.call(request)
        }
    }
}

async fn upload(store: Arc<BlobStore>, body: Body) -> Result<v1::UploadResponse, Status> {
    let mut reader = FrameReader::new(body);
    let idle_timeout = store.idle_timeout();
    let first = tokio::time::timeout(idle_timeout, reader.next_message())
        .await
        .map_err(|_| Status::from(TransferError::IdleTimeout(idle_timeout)))??;
    let blob = match first {
        Some(UploadPart::Header(header)) => blob_from_wire(header.blob)?,
        _ => {
            return Err(invalid_argument(
                "the first upload message must be a header naming the blob",
            ));
        }
    };
    let digest = blob.digest.clone();
    let chunks = futures::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        match reader.next_message().await {
            Ok(None) => None,
            Ok(Some(UploadPart::Chunk(chunk))) => Some((Ok(chunk), Some(reader))),
            Ok(Some(UploadPart::Header(_))) => Some((
                Err(TransferError::Protocol(
                    "a second header: send one header, then chunks".into(),
                )),
                None,
            )),
            Err(e) => Some((Err(e), None)),
        }
    });
    let outcome = store.upload(blob, Box::pin(chunks)).await?;
    tracing::debug!(%digest, ?outcome, "upload call finished");
    Ok(v1::UploadResponse {
        digest,
        complete: outcome.complete,
        chunks_received: outcome.chunks_received,
        bytes_received: outcome.bytes_received,
    })
}

/// A unary gRPC response: the framed message and `grpc-status: 0`, or the status alone.
fn grpc_response(result: Result<v1::UploadResponse, Status>) -> http::Response<Body> {
    let message = match result {
        Ok(message) => message,
        Err(status) => return status.into_http(),
    };
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = futures::stream::iter([
        Ok::<_, Infallible>(http_body::Frame::data(patchd_proto::grpc_frame(&message))),
        Ok(http_body::Frame::trailers(trailers)),
    ]);
    let mut response = http::Response::new(Body::new(http_body_util::StreamBody::new(frames)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// One upload message, converted.
#[derive(Debug)]
enum UploadPart {
    Header(v1::UploadHeader),
    Chunk(Chunk),
}

/// Reads gRPC messages from the DATA frames of a request body, byte by byte where it must and slice by slice where
/// it can.
struct FrameReader {
    body: Body,
    current: Bytes,
    /// Bytes consumed so far: message and field boundaries are checked against it.
    consumed: u64,
    /// Chunk buffers that the disk side has finished with, for the next chunks.
    buffers: BufferPool,
}

fn truncated() -> TransferError {
    TransferError::StreamBroken("the upload stream ended inside a message".into())
}

fn malformed(what: &str) -> TransferError {
    TransferError::Protocol(format!("malformed upload message: {what}"))
}

impl FrameReader {
    fn new(body: Body) -> Self {
        Self {
            body,
            current: Bytes::new(),
            consumed: 0,
            buffers: BufferPool::default(),
        }
    }

    /// Makes `current` non-empty; `false` at the end of the body.
    async fn fill(&mut self) -> Result<bool, TransferError> {
        while self.current.is_empty() {
            match self.body.frame().await {
                None => return Ok(false),
                Some(Err(status)) => {
                    return Err(TransferError::StreamBroken(status.message().to_string()));
                }
                Some(Ok(frame)) => {
                    // Trailers (a client's) carry nothing for an upload.
                    if let Ok(data) = frame.into_data() {
                        self.current = data;
                    }
                }
            }
        }
        Ok(true)
    }

    async fn byte(&mut self) -> Result<u8, TransferError> {
        if !self.fill().await? {
            return Err(truncated());
        }
        let byte = self.current.get_u8();
        self.consumed += 1;
        Ok(byte)
    }

    async fn varint(&mut self) -> Result<u64, TransferError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte().await?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("a varint longer than 10 bytes"))
    }

    /// Copies the next `len` bytes into `out`, frame slice by frame slice.
    async fn copy_into(&mut self, out: &mut Vec<u8>, mut len: usize) -> Result<(), TransferError> {
        while len > 0 {
            if !self.fill().await? {
                return Err(truncated());
            }
            let take = len.min(self.current.len());
            out.extend_from_slice(&self.current[..take]);
            self.current.advance(take);
            self.consumed += take as u64;
            len -= take;
        }
        Ok(())
    }

    async fn skip(&mut self, mut len: u64) -> Result<(), TransferError> {
        while len > 0 {
            if !self.fill().await? {
                return Err(truncated());
            }
            let take = len.min(self.current.len() as u64) as usize;
            self.current.advance(take);
            self.consumed += take as u64;
            len -= take as u64;
        }
        Ok(())
    }

    /// The next message, or `None` when the client closed the stream between messages.
    async fn next_message(&mut self) -> Result<Option<UploadPart>, TransferError> {
        if !self.fill().await? {
            return Ok(None);
        }
        if self.byte().await? != 0 {
            return Err(TransferError::Protocol(
                "compressed upload messages are not accepted: send them uncompressed".into(),
            ));
        }
        let mut len = 0u32;
        for _ in 0..4 {
            len = len << 8 | u32::from(self.byte().await?);
        }
        let len = len as usize;
        if len > patchd_proto::MAX_MESSAGE_BYTES {
            return Err(TransferError::Protocol(format!(
                "an upload message of {len} bytes exceeds the limit of {} bytes (chunks are at most 4 MiB)",
                patchd_proto::MAX_MESSAGE_BYTES
            )));
        }
        if len <= SMALL_MESSAGE_BYTES {
            let mut buf = Vec::with_capacity(len);
            self.copy_into(&mut buf, len).await?;
            let message =
                v1::UploadMessage::decode(&buf[..]).map_err(|e| malformed(&e.to_string()))?;
            return match message.kind {
                Some(Kind::Header(header)) => Ok(Some(UploadPart::Header(header))),
                Some(Kind::Chunk(chunk)) => {
                    let hash = hash_field(&chunk.hash, chunk.index)?;
                    Ok(Some(UploadPart::Chunk(Chunk {
                        index: chunk.index,
                        offset: chunk.offset,
                        data: chunk.data,
                        hash,
                    })))
                }
                None => Err(TransferError::Protocol("empty upload message".into())),
            };
        }
        self.large_chunk(len)
            .await
            .map(|c| Some(UploadPart::Chunk(c)))
    }

    /// An `UploadMessage` of `len` bytes that must hold an `UploadChunk` (field 2), read field by field.
    async fn large_chunk(&mut self, len: usize) -> Result<Chunk, TransferError> {
        let end = self.consumed + len as u64;
        let key = self.varint().await?;
        if key != (2 << 3 | 2) {
            return Err(malformed(
                "a large upload message must hold a chunk (field 2)",
            ));
        }
        let inner_len = self.varint().await?;
        if self.consumed + inner_len != end {
            return Err(malformed("the chunk's length does not match the message's"));
        }
        let (mut index, mut offset, mut data, mut hash) = (0, 0, Bytes::new(), Bytes::new());
        while self.consumed < end {
            let key = self.varint().await?;
            let (field, wire_type) = (key >> 3, key & 7);
            match (field, wire_type) {
                (1, 0) => index = self.varint().await?,
                (2, 0) => offset = self.varint().await?,
                (3, 2) => {
                    let field_len = self.length_within(end).await?;
                    data = self.aligned(field_len).await?;
                }
                (4, 2) => {
                    let field_len = self.length_within(end).await?;
                    if field_len > 64 {
                        return Err(malformed("a hash field longer than 64 bytes"));
                    }
                    let mut buf = Vec::with_capacity(field_len);
                    self.copy_into(&mut buf, field_len).await?;
                    hash = Bytes::from(buf);
                }
                // Unknown fields are skipped, as protobuf decoders do.
                (_, 0) => {
                    self.varint().await?;
                }
                (_, 1) => self.skip(8).await?,
                (_, 2) => {
                    let field_len = self.length_within(end).await?;
                    self.skip(field_len as u64).await?;
                }
                (_, 5) => self.skip(4).await?,
                _ => {
                    return Err(malformed(&format!(
                        "wire type {wire_type} of field {field}"
                    )));
                }
            }
        }
        if self.consumed != end {
            return Err(malformed("a field runs past the end of its message"));
        }
        let hash = hash_field(&hash, index)?;
        Ok(Chunk {
            index,
            offset,
            data,
            hash,
        })
    }

    /// A length-delimited field's length, checked against the end of its message.
    async fn length_within(&mut self, end: u64) -> Result<usize, TransferError> {
        let len = self.varint().await?;
        if self.consumed + len > end {
            return Err(malformed("a field runs past the end of its message"));
        }
        Ok(len as usize)
    }

    /// The next `len` bytes in a buffer whose first byte is [`DIRECT_IO_ALIGN`]-aligned.
    async fn aligned(&mut self, len: usize) -> Result<Bytes, TransferError> {
        let mut buf = self.buffers.take(len + DIRECT_IO_ALIGN);
        let start = buf.as_ptr().align_offset(DIRECT_IO_ALIGN);
        buf.resize(start, 0);
        // Within capacity: the buffer does not move, so `start` stays aligned.
        self.copy_into(&mut buf, len).await?;
        Ok(Bytes::from_owner(self.buffers.lend(buf)).slice(start..))
    }
}

/// Bytes of freed chunk buffers one upload keeps for reuse (at least two buffers).
const POOLED_BYTES: usize = 4 * 1024 * 1024;

/// The chunk buffers of one upload, reused: a freed megabyte block goes back to the kernel, and faulting and
/// zeroing it in again for the next chunk cost 5% of the agent's CPU. The pool lives as long as its upload:
/// buffers still queued for the disk when the upload ends are freed when the disk side drops them. An open upload
/// keeps at most [`POOLED_BYTES`] (two buffers with 4 MiB chunks) on top of its queues, even while paused.
#[derive(Debug, Default)]
struct BufferPool(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl BufferPool {
    /// An empty buffer of at least `capacity` bytes.
    fn take(&self, capacity: usize) -> Vec<u8> {
        let reused = self.0.lock().ok().and_then(|mut free| free.pop());
        match reused {
            Some(mut buf) if buf.capacity() >= capacity => {
                buf.clear();
                buf
            }
            _ => Vec::with_capacity(capacity),
        }
    }

    /// `buf`, coming back to this pool when its last user drops it.
    fn lend(&self, buf: Vec<u8>) -> PooledBuffer {
        PooledBuffer {
            buf,
            pool: Arc::downgrade(&self.0),
        }
    }
}

/// A chunk buffer that returns to its [`BufferPool`] when dropped, if the pool still exists and has room.
#[derive(Debug)]
struct PooledBuffer {
    buf: Vec<u8>,
    pool: std::sync::Weak<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let keep = (POOLED_BYTES / self.buf.capacity().max(1)).max(2);
        if let Some(pool) = self.pool.upgrade()
            && let Ok(mut free) = pool.lock()
            && free.len() < keep
        {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

fn hash_field(hash: &[u8], index: u64) -> Result<[u8; 32], TransferError> {
    hash.try_into().map_err(|_| {
        TransferError::Protocol(format!(
            "chunk {index} carries a {}-byte hash, expected 32",
            hash.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_buffers_return_to_the_pool_when_their_last_user_drops_them() {
        let pool = BufferPool::default();
        let mut first = pool.take(4096);
        first.extend_from_slice(b"first chunk");
        let first_ptr = first.as_ptr();
        let data = Bytes::from_owner(pool.lend(first));
        let held = data.slice(6..);
        drop(data);
        // A slice still uses the buffer: the next chunk gets another one, and the slice's bytes are intact.
        let second = pool.take(4096);
        assert_ne!(second.as_ptr(), first_ptr);
        assert_eq!(&held[..], b"chunk");
        drop(held);
        let reused = pool.take(4096);
        assert_eq!(reused.as_ptr(), first_ptr, "the freed buffer is reused");
        assert!(reused.is_empty(), "a reused buffer comes back empty");
        // A pooled buffer too small for the request is not handed out.
        drop(Bytes::from_owner(pool.lend(reused)));
        assert!(pool.take(8192).capacity() >= 8192);
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_buffers_and_dies_with_its_upload() {
        let pool = BufferPool::default();
        let big = POOLED_BYTES / 2 + 1;
        let lent: Vec<Bytes> = (0..4)
            .map(|_| Bytes::from_owner(pool.lend(pool.take(big))))
            .collect();
        drop(lent);
        assert_eq!(
            pool.0.lock().unwrap().len(),
            2,
            "at most two buffers this large"
        );
        // Buffers still out when the upload (and its pool) ends are simply freed: nothing keeps the pool alive.
        let out = Bytes::from_owner(pool.lend(pool.take(4096)));
        let weak = Arc::downgrade(&pool.0);
        drop(pool);
        assert!(
            weak.upgrade().is_none(),
            "a lent buffer does not keep the pool"
        );
        drop(out);
    }

    fn framed(message: &v1::UploadMessage) -> Vec<u8> {
        patchd_proto::grpc_frame(message).to_vec()
    }

    fn chunk_message(index: u64, data: Vec<u8>) -> v1::UploadMessage {
        v1::UploadMessage {
            kind: Some(Kind::Chunk(v1::UploadChunk {
                index,
                offset: index * 100_000,
                hash: Bytes::from(vec![index as u8; 32]),
                data: Bytes::from(data),
            })),
        }
    }

    /// A body that delivers `bytes` in frames of the given sizes (cycled), like HTTP/2 DATA frames.
    fn body_of(bytes: Vec<u8>, sizes: &[usize]) -> Body {
        let mut frames = Vec::new();
        let mut rest = Bytes::from(bytes);
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].min(rest.len());
            frames.push(Ok::<_, Infallible>(http_body::Frame::data(
                rest.split_to(n),
            )));
            i += 1;
        }
        Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )))
    }

    async fn read_all(body: Body) -> Result<Vec<UploadPart>, TransferError> {
        let mut reader = FrameReader::new(body);
        let mut parts = Vec::new();
        while let Some(part) = reader.next_message().await? {
            parts.push(part);
        }
        Ok(parts)
    }

    #[tokio::test]
    async fn messages_split_anywhere_decode_like_prost_and_large_data_is_aligned() {
        let header = v1::UploadMessage {
            kind: Some(Kind::Header(v1::UploadHeader {
                blob: Some(v1::BlobRef {
                    digest: "ab".repeat(32),
                    total_size: 300_000,
                    chunk_size: 131_072,
                    tree_version: 2,
                }),
            })),
        };
        let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let small: Vec<u8> = (0..1000u32).map(|i| (i % 13) as u8).collect();
        let mut bytes = framed(&header);
        bytes.extend(framed(&chunk_message(0, big.clone())));
        bytes.extend(framed(&chunk_message(1, small.clone())));
        bytes.extend(framed(&chunk_message(2, big.clone())));
        for sizes in [&[1usize][..], &[3, 7, 16_384], &[65_536], &[bytes.len()]] {
            let parts = read_all(body_of(bytes.clone(), sizes)).await.unwrap();
            assert_eq!(parts.len(), 4, "frame sizes {sizes:?}");
            assert!(
                matches!(&parts[0], UploadPart::Header(h) if h.blob.as_ref().unwrap().total_size == 300_000)
            );
            for (part, (index, data)) in parts[1..].iter().zip([(0, &big), (1, &small), (2, &big)])
            {
                let UploadPart::Chunk(chunk) = part else {
                    panic!("expected a chunk")
                };
                assert_eq!(chunk.index, index);
                assert_eq!(chunk.offset, index * 100_000);
                assert_eq!(chunk.hash, [index as u8; 32]);
                assert_eq!(&chunk.data[..], &data[..]);
                if data.len() > SMALL_MESSAGE_BYTES {
                    assert_eq!(chunk.data.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
                }
            }
        }
    }

    #[tokio::test]
    async fn unknown_fields_and_any_field_order_are_accepted() {
        // Hand-encoded UploadChunk: the hash first, an unknown varint field 9 and an unknown bytes field 10, then data
        // and index/offset last.
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut inner = Vec::new();
        prost::encoding::bytes::encode(4, &Bytes::from(vec![5u8; 32]), &mut inner);
        prost::encoding::uint64::encode(9, &77, &mut inner);
        prost::encoding::bytes::encode(10, &Bytes::from_static(b"future"), &mut inner);
        prost::encoding::bytes::encode(3, &Bytes::from(data.clone()), &mut inner);
        prost::encoding::uint64::encode(2, &4096, &mut inner);
        prost::encoding::uint64::encode(1, &1, &mut inner);
        let mut message = Vec::new();
        prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut message);
        prost::encoding::encode_varint(inner.len() as u64, &mut message);
        message.extend(inner);
        let mut bytes = patchd_proto::grpc_header(message.len()).to_vec();
        bytes.extend(message);
        let parts = read_all(body_of(bytes, &[4000])).await.unwrap();
        let [UploadPart::Chunk(chunk)] = &parts[..] else {
            panic!("expected one chunk, got {parts:?}")
        };
        assert_eq!((chunk.index, chunk.offset), (1, 4096));
        assert_eq!(chunk.hash, [5u8; 32]);
        assert_eq!(&chunk.data[..], &data[..]);
    }

    #[tokio::test]
    async fn hostile_framing_is_refused_with_a_reason() {
        let big = framed(&chunk_message(0, vec![1u8; 100_000]));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            // Cut inside the data field.
            (big[..50_000].to_vec(), "ended inside a message"),
            // Compressed flag.
            ([&[1u8][..], &big[1..]].concat(), "compressed"),
            // Announced length over the limit.
            (
                [&[0u8][..], &u32::MAX.to_be_bytes()[..]].concat(),
                "exceeds the limit",
            ),
            // A large message that is not a chunk (field 1 instead of 2).
            (
                [&big[..5], &[0x0a][..], &big[6..]].concat(),
                "must hold a chunk",
            ),
            // A data length that runs past the message.
            (
                {
                    let mut m = big.clone();
                    let pos = m.windows(3).position(|w| w == [0x1a, 0xa0, 0x8d]).unwrap();
                    m[pos + 2] = 0x8f; // 100_000 -> a larger length
                    m
                },
                "runs past the end",
            ),
        ];
        for (bytes, reason) in cases {
            let err = read_all(body_of(bytes, &[7_000])).await.unwrap_err();
            assert!(
                err.to_string().contains(reason),
                "{err} should name {reason:?}"
            );
        }
        // A clean end between messages is not an error.
        let parts = read_all(body_of(Vec::new(), &[1])).await.unwrap();
        assert!(parts.is_empty());
    }
}
