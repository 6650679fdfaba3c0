"""mellum2.infer"""
