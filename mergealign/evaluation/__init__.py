"""Safety metrics over judged generations, and domain benchmarks through lm-eval (imported lazily)."""
