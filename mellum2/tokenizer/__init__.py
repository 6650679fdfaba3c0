"""mellum2.tokenizer"""
