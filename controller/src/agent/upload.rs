//! The client side of `patchd.v1.Agent/Upload` without re-encoding chunk data. The wire format is unchanged:
//! gRPC framing and the same protobuf messages. But each chunk goes out as two HTTP/2 body pieces: a few dozen
//! bytes of framing and fields, then the chunk's own buffer as it was read from the file. tonic's generated client
//! would copy every message into its encode buffer first: a full extra copy of the package on the sender.

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use patchd_proto::{GRPC_HEADER_BYTES, UPLOAD_PATH, grpc_header, v1};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use std::convert::Infallible;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::transport::Channel;

/// The body pieces of one framed message: a chunk's data travels as its own piece, without a copy.
pub fn message_pieces(message: v1::UploadMessage) -> Vec<Bytes> {
    let chunk = match message.kind {
        Some(v1::upload_message::Kind::Chunk(chunk)) => chunk,
        kind => return vec![patchd_proto::grpc_frame(&v1::UploadMessage { kind })],
    };
    // UploadChunk fields in the order index, offset, hash, data: protobuf allows any order, and data last lets
    // its bytes follow as a piece of their own.
    let mut fields = BytesMut::with_capacity(64);
    prost::encoding::uint64::encode(1, &chunk.index, &mut fields);
    prost::encoding::uint64::encode(2, &chunk.offset, &mut fields);
    prost::encoding::bytes::encode(4, &chunk.hash, &mut fields);
    encode_key(3, WireType::LengthDelimited, &mut fields);
    encode_varint(chunk.data.len() as u64, &mut fields);
    let inner_len = fields.len() + chunk.data.len();
    let message_len = key_len(2) + encoded_len_varint(inner_len as u64) + inner_len;
    let mut head = BytesMut::with_capacity(GRPC_HEADER_BYTES + message_len - chunk.data.len());
    head.put_slice(&grpc_header(message_len));
    encode_key(2, WireType::LengthDelimited, &mut head);
    encode_varint(inner_len as u64, &mut head);
    head.put(fields);
    vec![head.freeze(), chunk.data]
}

/// Runs one Upload call on `channel` with the pieces of `messages`, and returns the agent's answer or its status.
pub async fn upload<S>(mut channel: Channel, messages: S) -> Result<v1::UploadResponse, Status>
where
    S: futures::Stream<Item = v1::UploadMessage> + Send + 'static,
{
    use futures::StreamExt;
    let frames = messages.flat_map(|message| {
        futures::stream::iter(
            message_pieces(message)
                .into_iter()
                .map(|piece| Ok::<_, Infallible>(http_body::Frame::data(piece))),
        )
    });
    let mut request = http::Request::new(Body::new(http_body_util::StreamBody::new(frames)));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(UPLOAD_PATH);
    let headers = request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));

    std::future::poll_fn(|cx| Service::<http::Request<Body>>::poll_ready(&mut channel, cx))
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    if let Some(status) = Status::from_header_map(response.headers())
        && status.code() != tonic::Code::Ok
    {
        return Err(status);
    }
    if response.status() != http::StatusCode::OK {
        return Err(Status::unknown(format!(
            "the agent answered the upload with HTTP {}",
            response.status()
        )));
    }
    let collected = response.into_body().collect().await?;
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    match trailers.as_ref().and_then(Status::from_header_map) {
        Some(status) if status.code() != tonic::Code::Ok => return Err(status),
        Some(_) => {}
        None => {
            return Err(Status::internal(
                "the agent's upload answer has no grpc-status trailer",
            ));
        }
    }
    decode_single(&body)
}

/// The one message of a unary gRPC answer.
fn decode_single(body: &[u8]) -> Result<v1::UploadResponse, Status> {
    let malformed = || Status::internal("malformed upload answer from the agent");
    let (head, rest) = body
        .split_at_checked(GRPC_HEADER_BYTES)
        .ok_or_else(malformed)?;
    if head[0] != 0 {
        return Err(malformed());
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if rest.len() != len {
        return Err(malformed());
    }
    v1::UploadResponse::decode(rest).map_err(|_| malformed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_of_a_chunk_decode_to_the_same_message() {
        let data = Bytes::from((0..70_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        for index in [0u64, 1, 300] {
            let message = v1::UploadMessage {
                kind: Some(v1::upload_message::Kind::Chunk(v1::UploadChunk {
                    index,
                    offset: index * 70_000,
                    data: data.clone(),
                    hash: Bytes::from(vec![9u8; 32]),
                })),
            };
            let pieces = message_pieces(message.clone());
            assert_eq!(pieces.len(), 2);
            assert_eq!(pieces[1].as_ptr(), data.as_ptr(), "the data is sent as is");
            let wire: Vec<u8> = pieces.concat();
            let len = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
            assert_eq!((wire[0], len), (0, wire.len() - 5));
            assert_eq!(v1::UploadMessage::decode(&wire[5..]).unwrap(), message);
        }
        let header = v1::UploadMessage {
            kind: Some(v1::upload_message::Kind::Header(v1::UploadHeader {
                blob: Some(v1::BlobRef {
                    digest: "cd".repeat(32),
                    total_size: 5,
                    chunk_size: 4096,
                    tree_version: 2,
                }),
            })),
        };
        let pieces = message_pieces(header.clone());
        assert_eq!(pieces.len(), 1);
        assert_eq!(v1::UploadMessage::decode(&pieces[0][5..]).unwrap(), header);
    }

    #[test]
    fn answers_are_decoded_or_refused() {
        let answer = v1::UploadResponse {
            digest: "ef".repeat(32),
            complete: true,
            chunks_received: 3,
            bytes_received: 12_288,
        };
        let framed = patchd_proto::grpc_frame(&answer);
        assert_eq!(decode_single(&framed).unwrap(), answer);
        assert!(decode_single(&framed[..framed.len() - 1]).is_err());
        assert!(decode_single(&[1, 0, 0, 0, 0]).is_err());
        assert!(decode_single(&[0, 0]).is_err());
    }
}
