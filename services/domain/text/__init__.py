"""Text rules for what people read: Khmer cut points, SMS segments."""
