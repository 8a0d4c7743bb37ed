"""What users hand guardprob: conversations and request shapes (conversation, reader), text
tokenized so it can never write a control token (controls), and the files they write
(datafile)."""
