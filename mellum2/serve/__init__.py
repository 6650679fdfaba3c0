"""mellum2.serve"""
