"""mellum2.posttrain"""
