//! The planner hook that lets the query forms users write reach an rsclip index.
//!
//! Postgres serves `ORDER BY col <op> q` (ascending, NULLS LAST) from an index whose operator
//! class orders by `<op>`, but offers no hook through which a function such as `rsclip_score`
//! could claim the same, and it plans a one-row function in FROM as a join, whose output no
//! index scan orders. So before standard planning, at every query level (subqueries, CTEs,
//! sublinks, expanded views), we rewrite two shapes into ones the planner already handles:
//!
//! 1. Sort keys into ordering operators, only where the order stays exactly the same:
//!    `rsclip_score(a, b) DESC` becomes `a <#> b` (`<#>` is the same product negated; both raise
//!    on overflow, so no NaN can sort differently), and the distance functions called by name
//!    (`embedding_negative_inner_product`, `embedding_cosine_distance`, `embedding_l2_distance`,
//!    ascending) become `<#>`, `<=>`, `<->`. `DESC` puts NULLs first where the operator's
//!    ascending order puts them last, so a score key that says NULLS FIRST (the default of
//!    `DESC`) becomes `a <#^ b` instead, `<#>` with NULLs at -infinity, which the index serves
//!    from its chain of NULL rows, unless its NULLs cannot occur (a NOT NULL column outside
//!    outer joins, or a WHERE clause that requires `col IS NOT NULL`). The score stays in the
//!    target list: only the sort key changes, as a junk column.
//! 2. A one-row function in FROM that returns `embedding`, as in
//!    `FROM tiles, rsclip_encode_text('...') q`, into the one-row subquery
//!    `(SELECT rsclip_encode_text('...') AS q) q`. Standard planning pulls that up, as it does
//!    the same query written with a CTE, so `ORDER BY emb <#> q` reaches the planner as
//!    `emb <#> rsclip_encode_text('...')`, which the index serves.
//!
//! The hook is installed by `_PG_init`, so it is in place from a backend's first query only
//! when the library is preloaded (`shared_preload_libraries` or `session_preload_libraries`);
//! otherwise from the moment something loads it.

use pgrx::pg_sys;
use std::ffi::{c_char, c_int, c_void, CStr};

static mut PREVIOUS_PLANNER: pg_sys::planner_hook_type = None;

/// Chains our planner in front of whatever was installed before (Citus, pg_stat_statements).
pub fn install() {
    // SAFETY: _PG_init runs once per process on its only thread, before any planning.
    unsafe {
        PREVIOUS_PLANNER = pg_sys::planner_hook;
        pg_sys::planner_hook = Some(rsclip_planner);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn rsclip_planner(
    parse: *mut pg_sys::Query,
    query_string: *const c_char,
    cursor_options: c_int,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    let mut catalog = Catalog::default();
    // SAFETY: `parse` is the analyzed, rewritten query Postgres is about to plan; the planner
    // owns it and may modify it (the plan cache hands over a copy).
    unsafe {
        rewrite_query(parse, &mut catalog);
        match PREVIOUS_PLANNER {
            Some(previous) => previous(parse, query_string, cursor_options, bound_params),
            None => pg_sys::standard_planner(parse, query_string, cursor_options, bound_params),
        }
    }
}

/// What a sort key's function is, when it is one of ours.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SortFunction {
    /// `rsclip_score`: descending order equals `<#>` ascending.
    Score,
    /// A distance function whose ascending order is its operator's.
    Distance(&'static CStr),
}

fn sort_function_by_name(name: &[u8]) -> Option<SortFunction> {
    match name {
        b"rsclip_score" => Some(SortFunction::Score),
        b"embedding_negative_inner_product" => Some(SortFunction::Distance(c"<#>")),
        b"embedding_cosine_distance" => Some(SortFunction::Distance(c"<=>")),
        b"embedding_l2_distance" => Some(SortFunction::Distance(c"<->")),
        _ => None,
    }
}

/// Catalog facts looked up at most once per planner call, and only for queries that have a
/// candidate (a sort key that is a function call, or a function in FROM).
#[derive(Default)]
struct Catalog {
    extension: Option<pg_sys::Oid>,
    embedding_types: Vec<(pg_sys::Oid, bool)>,
}

impl Catalog {
    /// The installed rsclip extension in this database (InvalidOid when there is none).
    fn extension(&mut self) -> pg_sys::Oid {
        // SAFETY: a catalog lookup by name; missing_ok returns InvalidOid instead of raising.
        *self
            .extension
            .get_or_insert_with(|| unsafe { pg_sys::get_extension_oid(c"rsclip".as_ptr(), true) })
    }

    fn member_of_extension(&mut self, class: pg_sys::Oid, object: pg_sys::Oid) -> bool {
        let extension = self.extension();
        // SAFETY: a pg_depend lookup; InvalidOid when the object belongs to no extension.
        extension != pg_sys::InvalidOid
            && unsafe { pg_sys::getExtensionOfObject(class, object) } == extension
    }

    /// Whether `typ` is our `embedding` (the extension's only base type that is no array).
    fn is_embedding(&mut self, typ: pg_sys::Oid) -> bool {
        if let Some(&(_, known)) = self.embedding_types.iter().find(|(t, _)| *t == typ) {
            return known;
        }
        // SAFETY: a syscache lookup of an existing type's element type.
        let is_array = unsafe { pg_sys::get_element_type(typ) } != pg_sys::InvalidOid;
        let ours = !is_array && self.member_of_extension(pg_sys::TypeRelationId, typ);
        self.embedding_types.push((typ, ours));
        ours
    }

    /// The sort-key role of function `funcid`, if it is one of ours.
    fn sort_function(&mut self, funcid: pg_sys::Oid) -> Option<SortFunction> {
        // SAFETY: a syscache lookup; NULL when the function is gone.
        let name = unsafe { pg_sys::get_func_name(funcid) };
        if name.is_null() {
            return None;
        }
        // SAFETY: get_func_name returns a palloc'd NUL-terminated copy of the name.
        let kind = sort_function_by_name(unsafe { CStr::from_ptr(name) }.to_bytes())?;
        self.member_of_extension(pg_sys::ProcedureRelationId, funcid)
            .then_some(kind)
    }

    /// Operator `name(typ, typ)` in the schema of function `funcid` (InvalidOid if none).
    fn operator_beside(
        &mut self,
        funcid: pg_sys::Oid,
        name: &CStr,
        typ: pg_sys::Oid,
    ) -> pg_sys::Oid {
        // SAFETY: catalog lookups; the qualified name is a fresh palloc'd list of String nodes.
        unsafe {
            let schema = pg_sys::get_namespace_name(pg_sys::get_func_namespace(funcid));
            if schema.is_null() {
                return pg_sys::InvalidOid;
            }
            let mut names =
                pg_sys::lappend(std::ptr::null_mut(), pg_sys::makeString(schema).cast());
            names = pg_sys::lappend(
                names,
                pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast(),
            );
            pg_sys::OpernameGetOprid(names, typ, typ)
        }
    }
}

/// Rewrites one query level and everything below it.
///
/// # Safety
/// `query` must be a valid, modifiable Query tree.
unsafe fn rewrite_query(query: *mut pg_sys::Query, catalog: &mut Catalog) {
    // SAFETY: guaranteed by the caller; children are reached through Postgres's own walker.
    unsafe {
        if (*query).commandType == pg_sys::CmdType::CMD_UTILITY {
            return;
        }
        convert_function_rtes(query, catalog);
        // Flags 0: also visit range-table subqueries and CTEs, which reach `walk` as Query nodes.
        pg_sys::query_tree_walker(query, Some(walk), (catalog as *mut Catalog).cast(), 0);
        rewrite_sort_keys(query, catalog);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn walk(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: `context` is the &mut Catalog given to query_tree_walker by rewrite_query, and
    // `node` a node of the tree being walked.
    unsafe {
        let catalog = &mut *(context as *mut Catalog);
        if (*node).type_ == pg_sys::NodeTag::T_Query {
            rewrite_query(node.cast(), catalog);
            return false;
        }
        pg_sys::expression_tree_walker(node, Some(walk), context)
    }
}

/// Cell `n` of a pointer list.
///
/// # Safety
/// `list` must be a valid pointer List with more than `n` cells.
unsafe fn nth<T>(list: *mut pg_sys::List, n: i32) -> *mut T {
    // SAFETY: guaranteed by the caller.
    unsafe { pg_sys::list_nth(list, n) as *mut T }
}

fn length(list: *mut pg_sys::List) -> i32 {
    if list.is_null() {
        0
    } else {
        // SAFETY: a non-NIL List pointer from a Query tree.
        unsafe { (*list).length }
    }
}

/// Turns `FROM ..., f(args) alias` (one non-set-returning function returning `embedding`, no
/// column list, no ordinality) into `FROM ..., (SELECT f(args) AS alias) alias`.
///
/// # Safety
/// `query` must be a valid, modifiable Query.
unsafe fn convert_function_rtes(query: *mut pg_sys::Query, catalog: &mut Catalog) {
    // SAFETY: guaranteed by the caller; every node is checked for its tag before the cast.
    unsafe {
        let rtable = (*query).rtable;
        for i in 0..length(rtable) {
            let rte: *mut pg_sys::RangeTblEntry = nth(rtable, i);
            if (*rte).rtekind != pg_sys::RTEKind::RTE_FUNCTION
                || (*rte).funcordinality
                || length((*rte).functions) != 1
            {
                continue;
            }
            let function: *mut pg_sys::RangeTblFunction = nth((*rte).functions, 0);
            let expr = (*function).funcexpr;
            if !(*function).funccolnames.is_null()
                || (*function).funccolcount != 1
                || expr.is_null()
                || (*expr).type_ != pg_sys::NodeTag::T_FuncExpr
            {
                continue;
            }
            let call = expr as *mut pg_sys::FuncExpr;
            // A volatile call would not be pulled up (and must stay one call per row of FROM).
            if (*call).funcretset
                || !catalog.is_embedding((*call).funcresulttype)
                || pg_sys::contain_volatile_functions(expr)
            {
                continue;
            }
            let colnames = (*(*rte).eref).colnames;
            if length(colnames) != 1 {
                continue;
            }
            let column_name = pg_sys::pstrdup((*nth::<pg_sys::String>(colnames, 0)).sval);
            // The call moves one level down, so its Vars (LATERAL references) point one further up.
            let had_own_level_vars = pg_sys::contain_vars_of_level(expr, 0);
            pg_sys::IncrementVarSublevelsUp(expr, 1, 0);

            let sub = pg_sys::palloc0(std::mem::size_of::<pg_sys::Query>()) as *mut pg_sys::Query;
            (*sub).type_ = pg_sys::NodeTag::T_Query;
            (*sub).commandType = pg_sys::CmdType::CMD_SELECT;
            (*sub).querySource = pg_sys::QuerySource::QSRC_ORIGINAL;
            (*sub).canSetTag = true;
            (*sub).hasSubLinks = pg_sys::checkExprHasSubLink(expr);
            (*sub).jointree = pg_sys::makeFromExpr(std::ptr::null_mut(), std::ptr::null_mut());
            let entry = pg_sys::makeTargetEntry(expr.cast(), 1, column_name, false);
            (*sub).targetList = pg_sys::lappend(std::ptr::null_mut(), entry.cast());

            (*rte).rtekind = pg_sys::RTEKind::RTE_SUBQUERY;
            (*rte).subquery = sub;
            (*rte).functions = std::ptr::null_mut();
            (*rte).lateral |= had_own_level_vars;
        }
    }
}

/// The float8 operators that sort ascending and descending, and equality.
struct Float8Operators {
    less: pg_sys::Oid,
    greater: pg_sys::Oid,
    equal: pg_sys::Oid,
}

fn float8_operators() -> Float8Operators {
    // SAFETY: the type cache entry of a built-in type; it lives for the backend's lifetime.
    unsafe {
        let flags = pg_sys::TYPECACHE_LT_OPR | pg_sys::TYPECACHE_GT_OPR | pg_sys::TYPECACHE_EQ_OPR;
        let entry = pg_sys::lookup_type_cache(pg_sys::FLOAT8OID, flags as c_int);
        Float8Operators {
            less: (*entry).lt_opr,
            greater: (*entry).gt_opr,
            equal: (*entry).eq_opr,
        }
    }
}

/// Rewrites this level's sort keys that call our score or distance functions (see the module
/// comment for when).
///
/// # Safety
/// `query` must be a valid, modifiable Query.
unsafe fn rewrite_sort_keys(query: *mut pg_sys::Query, catalog: &mut Catalog) {
    // SAFETY: guaranteed by the caller; nodes are checked for their tag before each cast.
    unsafe {
        let q = &mut *query;
        // Grouping, DISTINCT, window functions and set-returning target lists sort or compute
        // after what a new target column could see; leave such levels alone.
        if q.commandType != pg_sys::CmdType::CMD_SELECT
            || q.sortClause.is_null()
            || !q.setOperations.is_null()
            || !q.groupClause.is_null()
            || !q.groupingSets.is_null()
            || !q.distinctClause.is_null()
            || q.hasAggs
            || q.hasWindowFuncs
            || q.hasTargetSRFs
        {
            return;
        }
        let mut float8: Option<Float8Operators> = None;
        for k in 0..length(q.sortClause) {
            let key: *mut pg_sys::SortGroupClause = nth(q.sortClause, k);
            let Some(entry) = target_of(q.targetList, (*key).tleSortGroupRef) else {
                continue;
            };
            let expr = (*entry).expr as *mut pg_sys::Node;
            if expr.is_null() || (*expr).type_ != pg_sys::NodeTag::T_FuncExpr {
                continue;
            }
            let call = expr as *mut pg_sys::FuncExpr;
            if length((*call).args) != 2 {
                continue;
            }
            let Some(function) = catalog.sort_function((*call).funcid) else {
                continue;
            };
            let (a, b) = (
                nth::<pg_sys::Node>((*call).args, 0),
                nth::<pg_sys::Node>((*call).args, 1),
            );
            let typ = pg_sys::exprType(a);
            if typ != pg_sys::exprType(b) || !catalog.is_embedding(typ) {
                continue;
            }
            let ops = float8.get_or_insert_with(float8_operators);
            let operator = match function {
                SortFunction::Score => {
                    if (*key).sortop != ops.greater {
                        continue;
                    }
                    // DESC's NULLs come first: `<#^` ranks them first (-infinity) where they can
                    // occur; `<#>` (which the other operator classes' scans share) elsewhere.
                    if (*key).nulls_first && !score_cannot_be_null(q, a, b) {
                        c"<#^"
                    } else {
                        c"<#>"
                    }
                }
                SortFunction::Distance(name) => {
                    if (*key).sortop != ops.less || (*key).nulls_first {
                        continue;
                    }
                    name
                }
            };
            // Two evaluations of a volatile argument (target list and sort key) could differ.
            if !(*entry).resjunk && pg_sys::contain_volatile_functions(expr) {
                continue;
            }
            let opno = catalog.operator_beside((*call).funcid, operator, typ);
            if opno == pg_sys::InvalidOid {
                continue;
            }
            let sort_expr = pg_sys::make_opclause(
                opno,
                pg_sys::FLOAT8OID,
                false,
                pg_sys::copyObjectImpl(a.cast()).cast(),
                pg_sys::copyObjectImpl(b.cast()).cast(),
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
            );
            (*(sort_expr as *mut pg_sys::OpExpr)).opfuncid = pg_sys::get_opcode(opno);

            if (*entry).resjunk || function != SortFunction::Score {
                // Not returned to the client, or the same value under another name: replace.
                (*entry).expr = sort_expr;
            } else {
                let next_ref = max_sort_group_ref(q.targetList) + 1;
                let resno = (length(q.targetList) + 1) as pg_sys::AttrNumber;
                let junk = pg_sys::makeTargetEntry(sort_expr, resno, std::ptr::null_mut(), true);
                (*junk).ressortgroupref = next_ref;
                q.targetList = pg_sys::lappend(q.targetList, junk.cast());
                (*key).tleSortGroupRef = next_ref;
            }
            (*key).sortop = ops.less;
            (*key).eqop = ops.equal;
            (*key).nulls_first = false;
            #[cfg(feature = "pg18")]
            {
                (*key).reverse_sort = false;
            }
        }
    }
}

/// The target entry a sort clause refers to.
///
/// # Safety
/// `tlist` must be a valid target list.
unsafe fn target_of(
    tlist: *mut pg_sys::List,
    sort_ref: pg_sys::Index,
) -> Option<*mut pg_sys::TargetEntry> {
    // SAFETY: guaranteed by the caller.
    unsafe {
        (0..length(tlist))
            .map(|i| nth::<pg_sys::TargetEntry>(tlist, i))
            .find(|&e| (*e).ressortgroupref == sort_ref)
    }
}

/// # Safety
/// `tlist` must be a valid target list.
unsafe fn max_sort_group_ref(tlist: *mut pg_sys::List) -> pg_sys::Index {
    // SAFETY: guaranteed by the caller.
    unsafe {
        (0..length(tlist))
            .map(|i| (*nth::<pg_sys::TargetEntry>(tlist, i)).ressortgroupref)
            .max()
            .unwrap_or(0)
    }
}

/// Whether `rsclip_score(a, b)` is non-NULL on every row, or NULL on all of them (then every
/// order is right): one side is a column that cannot be NULL, and the other side is the same
/// for every row.
///
/// # Safety
/// `q`, `a` and `b` must be valid nodes of one query level.
unsafe fn score_cannot_be_null(
    q: &pg_sys::Query,
    a: *mut pg_sys::Node,
    b: *mut pg_sys::Node,
) -> bool {
    // SAFETY: guaranteed by the caller.
    unsafe {
        [(a, b), (b, a)].into_iter().any(|(column, other)| {
            (*column).type_ == pg_sys::NodeTag::T_Var
                && (*(column as *mut pg_sys::Var)).varlevelsup == 0
                && same_on_every_row(q, other)
                && column_cannot_be_null(q, column as *mut pg_sys::Var, 0)
        })
    }
}

/// Whether `expr` has one value for the whole query level: it uses no column of the level
/// (a constant, a parameter, a scalar subquery), or it is the column of a one-row subquery
/// without FROM, such as a function in FROM after `convert_function_rtes`.
///
/// # Safety
/// `expr` must be a valid node of query level `q`.
unsafe fn same_on_every_row(q: &pg_sys::Query, expr: *mut pg_sys::Node) -> bool {
    // SAFETY: guaranteed by the caller; the range-table index of a Var of this level is valid.
    unsafe {
        if pg_sys::contain_volatile_functions(expr) {
            return false;
        }
        if !pg_sys::contain_vars_of_level(expr, 0) {
            return true;
        }
        if (*expr).type_ != pg_sys::NodeTag::T_Var {
            return false;
        }
        let rte = rte_of(q, expr as *mut pg_sys::Var);
        if (*rte).rtekind != pg_sys::RTEKind::RTE_SUBQUERY || (*rte).lateral {
            return false;
        }
        let sub = (*rte).subquery;
        (*sub).setOperations.is_null()
            && !(*sub).hasTargetSRFs
            && !(*sub).jointree.is_null()
            && (*(*sub).jointree).fromlist.is_null()
    }
}

/// The range-table entry of a Var of query level `q`.
///
/// # Safety
/// `var` must be a Var of level 0 in `q`.
unsafe fn rte_of(q: &pg_sys::Query, var: *mut pg_sys::Var) -> *mut pg_sys::RangeTblEntry {
    // SAFETY: guaranteed by the caller.
    unsafe {
        // varno is `Index` (u32) before PG16 and `int` after.
        #[allow(clippy::unnecessary_cast)]
        let varno = (*var).varno as i32;
        nth(q.rtable, varno - 1)
    }
}

/// Whether column `var` of level `q` is never NULL: required by WHERE, or a NOT NULL table
/// column (directly or through views and subqueries) that no outer join can NULL-extend.
///
/// # Safety
/// `var` must be a Var of level 0 in `q`.
unsafe fn column_cannot_be_null(q: &pg_sys::Query, var: *mut pg_sys::Var, depth: u32) -> bool {
    // SAFETY: guaranteed by the caller; subquery target entries are found by their resno.
    unsafe {
        if !q.jointree.is_null() && where_requires_not_null((*q.jointree).quals, var) {
            return true;
        }
        if depth > 16 || q.jointree.is_null() || has_outer_join((*q.jointree).fromlist.cast()) {
            return false;
        }
        let attno = (*var).varattno;
        if attno <= 0 {
            return false;
        }
        let rte = rte_of(q, var);
        match (*rte).rtekind {
            pg_sys::RTEKind::RTE_RELATION => {
                let tuple = pg_sys::SearchSysCacheAttNum((*rte).relid, attno);
                if tuple.is_null() {
                    return false;
                }
                let attribute = pg_sys::GETSTRUCT(tuple) as *const pg_sys::FormData_pg_attribute;
                let not_null = (*attribute).attnotnull;
                pg_sys::ReleaseSysCache(tuple);
                not_null
            }
            pg_sys::RTEKind::RTE_SUBQUERY => {
                let sub = &*(*rte).subquery;
                if !sub.setOperations.is_null() || !sub.groupingSets.is_null() {
                    return false;
                }
                let entry = (0..length(sub.targetList))
                    .map(|i| nth::<pg_sys::TargetEntry>(sub.targetList, i))
                    .find(|&e| (*e).resno == attno);
                match entry {
                    Some(e)
                        if !(*e).expr.is_null() && (*(*e).expr).type_ == pg_sys::NodeTag::T_Var =>
                    {
                        let inner = (*e).expr as *mut pg_sys::Var;
                        (*inner).varlevelsup == 0 && column_cannot_be_null(sub, inner, depth + 1)
                    }
                    _ => false,
                }
            }
            _ => false,
        }
    }
}

/// Whether a WHERE clause can only be true where `var IS NOT NULL` (looking through AND).
///
/// # Safety
/// `quals` must be NULL or a valid expression, `var` a valid Var.
unsafe fn where_requires_not_null(quals: *mut pg_sys::Node, var: *mut pg_sys::Var) -> bool {
    // SAFETY: guaranteed by the caller; tags are checked before each cast.
    unsafe {
        if quals.is_null() {
            return false;
        }
        match (*quals).type_ {
            pg_sys::NodeTag::T_List => {
                let list = quals as *mut pg_sys::List;
                (0..length(list)).any(|i| where_requires_not_null(nth(list, i), var))
            }
            pg_sys::NodeTag::T_BoolExpr => {
                let b = quals as *mut pg_sys::BoolExpr;
                (*b).boolop == pg_sys::BoolExprType::AND_EXPR
                    && where_requires_not_null((*b).args.cast(), var)
            }
            pg_sys::NodeTag::T_NullTest => {
                let t = quals as *mut pg_sys::NullTest;
                (*t).nulltesttype == pg_sys::NullTestType::IS_NOT_NULL
                    && !(*t).argisrow
                    && pg_sys::equal((*t).arg as *const c_void, var as *const c_void)
            }
            _ => false,
        }
    }
}

/// Whether a FROM list holds a join other than an inner one (whose NULL-extended rows a NOT
/// NULL column does not rule out).
///
/// # Safety
/// `node` must be NULL or a valid jointree node.
unsafe fn has_outer_join(node: *mut pg_sys::Node) -> bool {
    // SAFETY: guaranteed by the caller; tags are checked before each cast.
    unsafe {
        if node.is_null() {
            return false;
        }
        match (*node).type_ {
            pg_sys::NodeTag::T_List => {
                let list = node as *mut pg_sys::List;
                (0..length(list)).any(|i| has_outer_join(nth(list, i)))
            }
            pg_sys::NodeTag::T_FromExpr => {
                has_outer_join((*(node as *mut pg_sys::FromExpr)).fromlist.cast())
            }
            pg_sys::NodeTag::T_JoinExpr => {
                let j = node as *mut pg_sys::JoinExpr;
                (*j).jointype != pg_sys::JoinType::JOIN_INNER
                    || has_outer_join((*j).larg)
                    || has_outer_join((*j).rarg)
            }
            _ => false,
        }
    }
}
