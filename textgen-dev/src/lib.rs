pub mod chat;
pub mod sampling;
pub mod tokenizer;
