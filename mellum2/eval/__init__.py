"""mellum2.eval"""
