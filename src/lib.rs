//! pushgate library root.
pub mod proto {
    tonic::include_proto!("pushgate.v1");
}
