mod tensor;
pub use tensor::{Tensor, TensorData};
