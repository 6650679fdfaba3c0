"""mellum2.data"""
