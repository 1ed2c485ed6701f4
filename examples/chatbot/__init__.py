"""A chatbot over your own documents: D2LLM retrieval from Qdrant + a LlamaIndex chat engine."""
